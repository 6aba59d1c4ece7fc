//! The router's own TLS listener (`TLS_CERT_FILE`, `TLS_KEY_FILE`): HTTP/1.1 and HTTP/2 by ALPN, a
//! certificate rotated in place (a symlink swap, as cert-manager and kubelet do it) while
//! connections stay open, a broken rotation that keeps the certificate in use, the handshake
//! timeout, start errors that name the variable; and real clients over TLS: skopeo with
//! `--cert-dir`, containerd with a `hosts.toml` `ca`, the docker daemon trusting the CA under
//! `/etc/docker/certs.d/<host:port>/`, curl on HTTP/2.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};

use common::{wait_until, Response, Router, DEADLINE};

/// A private CA and the files of the certificates it signs, in a directory of their own.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A leaf certificate: its DER (to recognise it on the wire) and PEM files.
struct Leaf {
    der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("hr-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "harbor-router test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        Pki { dir, ca, ca_key }
    }

    /// A certificate for 127.0.0.1 and localhost, signed by the CA.
    fn leaf(&self) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Leaf {
            der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Publishes `leaf` as `tls.crt` and `tls.key` the way a Secret volume does: the files are
    /// symlinks through `..data`, which is swapped in one rename.
    fn publish(&self, leaf: &Leaf, version: u32) {
        self.publish_raw(&leaf.cert_pem, &leaf.key_pem, version);
    }

    fn publish_raw(&self, cert: &str, key: &str, version: u32) {
        let v = self.dir.join(format!("..v{version}"));
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(v.join("tls.crt"), cert).unwrap();
        std::fs::write(v.join("tls.key"), key).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..v{version}"), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for f in ["tls.crt", "tls.key"] {
            let link = self.dir.join(f);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{f}"), &link).unwrap();
            }
        }
    }

    fn cert_file(&self) -> String {
        self.dir.join("tls.crt").display().to_string()
    }

    fn key_file(&self) -> String {
        self.dir.join("tls.key").display().to_string()
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A client configuration that trusts the CA and offers `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca.der().to_vec()))
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `addr`, its handshake done.
fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Tls {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("the TLS handshake");
    }
    rustls::StreamOwned::new(conn, tcp)
}

/// The certificate a connection was given.
fn served(s: &Tls) -> Vec<u8> {
    s.conn.peer_certificates().unwrap()[0].to_vec()
}

/// One HTTP/1.1 request on a keep-alive TLS connection, and its answer.
fn get(s: &mut Tls, path: &str) -> Response {
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    s.flush().unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some((res, _)) = common::parse_response_to(&buf, false) {
            return res;
        }
        let mut chunk = [0u8; 16384];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn tls_router(pki: &Pki, vars: &[(&str, &str)]) -> Router {
    let (cert, key) = (pki.cert_file(), pki.key_file());
    let mut env = vec![
        ("WORKERS", "2"),
        ("TLS_CERT_FILE", cert.as_str()),
        ("TLS_KEY_FILE", key.as_str()),
    ];
    env.extend_from_slice(vars);
    Router::start(&env)
}

#[test]
fn http1_and_http2_by_alpn_and_a_rotation_reaches_new_connections_while_old_ones_stay() {
    let pki = Pki::new("rotate");
    let first = pki.leaf();
    pki.publish(&first, 1);
    let router = tls_router(&pki, &[("TLS_RELOAD_INTERVAL", "100ms")]);
    let h1 = pki.client(&[b"http/1.1"]);
    let mut old = connect(router.addr, h1.clone());
    assert_eq!(served(&old), first.der);
    assert_eq!(old.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(get(&mut old, "/v2/").status, 200);
    let h2 = connect(router.addr, pki.client(&[b"h2", b"http/1.1"]));
    assert_eq!(
        h2.conn.alpn_protocol(),
        Some(&b"h2"[..]),
        "HTTP/2 when the client offers it"
    );
    drop(h2);

    // cert-manager renews: the Secret volume's symlink is swapped.
    let second = pki.leaf();
    pki.publish(&second, 2);
    wait_until("new connections get the new certificate", || {
        served(&connect(router.addr, h1.clone())) == second.der
    });
    assert_eq!(
        get(&mut old, "/v2/").status,
        200,
        "a connection opened before the rotation goes on"
    );
    assert_eq!(served(&old), first.der);

    // A renewal that goes wrong (a key that is not the certificate's): the new certificate stays.
    let third = pki.leaf();
    pki.publish_raw(&third.cert_pem, &second.key_pem, 3);
    wait_until("the broken pair is refused", || {
        router.scrape()[r#"harbor_router_tls_certificate_reloads_total{result="refused"}"#] >= 1.0
    });
    assert_eq!(served(&connect(router.addr, h1.clone())), second.der);
    router.wait_log(|l| l.contains("keeping the certificate in use"));

    let m = router.scrape();
    assert_eq!(
        m[r#"harbor_router_tls_certificate_reloads_total{result="reloaded"}"#],
        1.0
    );
    assert!(m[r#"harbor_router_tls_connections_total{protocol="h2"}"#] >= 1.0);
    assert!(m[r#"harbor_router_tls_connections_total{protocol="http/1.1"}"#] >= 3.0);
}

#[test]
fn a_client_that_never_finishes_its_handshake_is_cut_and_plain_http_gets_nothing() {
    let pki = Pki::new("timeout");
    pki.publish(&pki.leaf(), 1);
    let router = tls_router(&pki, &[("HEADER_READ_TIMEOUT", "1s")]);
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(router.addr).unwrap();
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        silent.read(&mut buf).expect("closed, not timed out"),
        0,
        "closed once the handshake timeout passed"
    );
    assert!(started.elapsed() < DEADLINE / 2);
    // A client that finishes the handshake with ALPN h2 and then sends nothing (no preface): told
    // GOAWAY once idle, and dropped when it does not close.
    let started = std::time::Instant::now();
    let mut mute = connect(router.addr, pki.client(&[b"h2"]));
    let mut got = Vec::new();
    let _ = mute.read_to_end(&mut got);
    assert!(
        started.elapsed() < DEADLINE / 2,
        "dropped by the router, not by the client's timeout"
    );
    // Plain HTTP to the TLS port: the handshake fails; no HTTP answer leaks.
    let mut plain = TcpStream::connect(router.addr).unwrap();
    plain.set_read_timeout(Some(DEADLINE)).unwrap();
    plain
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    wait_until("both counted", || {
        router.scrape()["harbor_router_tls_handshake_failures_total"] >= 2.0
    });
}

/// Starts the router with `env` and expects it to refuse its configuration, naming `var`.
fn refused(env: &[(&str, &str)], var: &str) -> String {
    let mut r = Router::spawn({
        let mut c = Command::new(env!("CARGO_BIN_EXE_harbor-router"));
        c.env_clear()
            .env("HARBOR_URL", "http://127.0.0.1:9")
            .envs(env.iter().copied());
        c
    });
    let status = r.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(64), "{env:?}");
    wait_until("the refusal names the variable", || {
        r.stderr().contains(var)
    });
    r.stderr()
}

#[test]
fn bad_tls_files_are_refused_at_start_naming_the_variable_never_the_content() {
    let pki = Pki::new("refuse");
    let leaf = pki.leaf();
    pki.publish(&leaf, 1);
    let (cert, key) = (pki.cert_file(), pki.key_file());
    refused(&[("TLS_CERT_FILE", &cert)], "TLS_KEY_FILE");
    refused(&[("TLS_KEY_FILE", &key)], "TLS_CERT_FILE");
    refused(
        &[
            ("TLS_CERT_FILE", "/nonexistent.pem"),
            ("TLS_KEY_FILE", &key),
        ],
        "TLS_CERT_FILE",
    );
    let other = pki.leaf();
    let wrong = pki.dir.join("wrong.key");
    std::fs::write(&wrong, &other.key_pem).unwrap();
    let wrong = wrong.display().to_string();
    let said = refused(
        &[("TLS_CERT_FILE", &cert), ("TLS_KEY_FILE", &wrong)],
        "TLS_KEY_FILE",
    );
    assert!(said.contains("does not match"), "{said}");
    // The key where the certificate should be: refused, and the key is not printed.
    let said = refused(
        &[("TLS_CERT_FILE", &key), ("TLS_KEY_FILE", &key)],
        "TLS_CERT_FILE",
    );
    assert!(!said.contains("PRIVATE KEY"), "{said}");
}

/// The test bed with one image, and a router with TLS in front of it (its certificate from a CA of
/// the test's own); `vars` on top.
struct TlsBed {
    bed: testbed::Testbed,
    seeded: testbed::Seeded,
    pki: Pki,
    router: Router,
}

fn tls_bed(
    name: &str,
    repository: &str,
    kind: testbed::SeedKind,
    layer_bytes: usize,
    vars: &[(&str, &str)],
) -> TlsBed {
    let bed = testbed::Testbed::start(testbed::HarborConfig::default()).unwrap();
    let seeded = bed
        .seed(&[testbed::SeedImage {
            repository: repository.into(),
            tag: "v1".into(),
            kind,
            layer_bytes,
        }])
        .unwrap()
        .remove(0);
    let pki = Pki::new(name);
    pki.publish(&pki.leaf(), 1);
    let url = bed.harbor.url();
    let mut env = common::bed_env(&url);
    let (cert, key) = (pki.cert_file(), pki.key_file());
    env.extend_from_slice(&[
        ("TLS_CERT_FILE", cert.as_str()),
        ("TLS_KEY_FILE", key.as_str()),
    ]);
    env.extend_from_slice(vars);
    let router = Router::start(&env);
    wait_until("the router is ready", || {
        common::get(router.metrics_addr(), "/readyz").status == 200
    });
    TlsBed {
        bed,
        seeded,
        pki,
        router,
    }
}

fn skopeo(args: &[&str]) -> std::process::Output {
    Command::new("skopeo")
        .args(args)
        .output()
        .expect("skopeo (Debian package skopeo)")
}

#[test]
fn skopeo_and_containerd_pull_over_tls_with_the_registrys_digests() {
    let TlsBed {
        seeded,
        pki,
        router,
        bed: _bed,
    } = tls_bed(
        "clients",
        "dockerhub/library/alpine",
        testbed::SeedKind::OciIndex,
        4096,
        &[("WORKERS", "2")],
    );

    // skopeo, trusting the CA through --cert-dir (a directory with ca.crt), as for any registry.
    let certs = pki.dir.join("skopeo");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(pki.ca_file(), certs.join("ca.crt")).unwrap();
    let image = format!("docker://{}/proxy/library/alpine:v1", router.addr);
    let out = skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        certs.to_str().unwrap(),
        &image,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256(&out.stdout),
        seeded.digest,
        "the index, byte for byte"
    );
    let into = pki.dir.join("copied");
    let out = skopeo(&[
        "copy",
        "--src-cert-dir",
        certs.to_str().unwrap(),
        &image,
        &format!("dir:{}", into.display()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        router.scrape()["harbor_router_tls_handshake_failures_total"],
        0.0
    );
    // Without the CA, the certificate is refused: TLS is really in the way.
    let out = skopeo(&["inspect", "--raw", &image]);
    assert!(!out.status.success());
    let refused = router.scrape()["harbor_router_tls_handshake_failures_total"];
    assert!(refused >= 1.0, "skopeo's handshakes failed");

    // containerd, with the CA in hosts.toml.
    let node = testbed::containerd::Containerd::start().unwrap();
    let hosts = node.hosts_dir("hosts-tls");
    let d = hosts.join("docker.io");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"https://registry-1.docker.io\"\n\n[host.\"https://{}/v2/proxy\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n  ca = \"{}\"\n",
            router.addr,
            pki.ca_file().display()
        ),
    )
    .unwrap();
    let tls_connections = |m: &std::collections::BTreeMap<String, f64>| {
        m[r#"harbor_router_tls_connections_total{protocol="h2"}"#]
            + m[r#"harbor_router_tls_connections_total{protocol="http/1.1"}"#]
    };
    let before = tls_connections(&router.scrape());
    let got = node
        .pull(&hosts, "docker.io/library/alpine:v1")
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", node.log()));
    assert_eq!(got, seeded.digest);
    assert!(
        tls_connections(&router.scrape()) > before,
        "containerd came over TLS"
    );

    // curl, which offers HTTP/2 (skopeo and containerd, with a CA of their own configured, did not
    // here): the index, the manifest and a blob over h2, byte for byte.
    let h2_before = router.scrape()[r#"harbor_router_tls_connections_total{protocol="h2"}"#];
    let index: serde_json::Value = serde_json::from_slice(&curl_h2(
        &pki,
        router.addr,
        "/v2/proxy/library/alpine/manifests/v1",
        &seeded.digest,
    ))
    .unwrap();
    let platform = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(&curl_h2(
        &pki,
        router.addr,
        &format!("/v2/proxy/library/alpine/manifests/{platform}"),
        &platform,
    ))
    .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    curl_h2(
        &pki,
        router.addr,
        &format!("/v2/proxy/library/alpine/blobs/{layer}"),
        &layer,
    );
    let m = router.scrape();
    assert_eq!(
        m[r#"harbor_router_tls_connections_total{protocol="h2"}"#],
        h2_before + 3.0,
        "each curl on HTTP/2"
    );
    assert_eq!(
        m["harbor_router_tls_handshake_failures_total"], refused,
        "every other handshake succeeded"
    );
}

/// `path` fetched with curl over HTTP/2, checked against `digest`; its body.
fn curl_h2(pki: &Pki, addr: SocketAddr, path: &str, digest: &str) -> Vec<u8> {
    let accept = "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--http2", "--cacert"])
        .arg(pki.ca_file())
        .args(["-H", accept, "-w", "\n%{http_version}"])
        .arg(format!("https://{addr}{path}"))
        .output()
        .expect("curl (Debian package curl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut body = out.stdout;
    let split = body.iter().rposition(|b| *b == b'\n').unwrap();
    let version = String::from_utf8(body.split_off(split)).unwrap();
    assert_eq!(version.trim(), "2", "HTTP/2 for {path}");
    assert_eq!(sha256(&body), digest, "{path}");
    body
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(b))
}

/// A docker daemon of the test's own (Debian's `docker.io`): its own data and exec roots and
/// socket, no iptables, no bridge, vfs storage. Stopped, unmounted and removed on drop, with the
/// CA it was given under `/etc/docker/certs.d/`.
struct Dockerd {
    child: std::process::Child,
    dir: PathBuf,
    trusted: Option<PathBuf>,
}

impl Dockerd {
    fn start() -> Dockerd {
        // Short: containerd's socket under the exec root must fit a unix socket path.
        let dir = PathBuf::from(format!("/tmp/hr-dk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args(["--storage-driver=vfs", "--iptables=false", "--bridge=none"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd (Debian package docker.io)");
        let d = Dockerd {
            child,
            dir,
            trusted: None,
        };
        common::wait_for("the docker daemon answers", || {
            d.docker(&["version"]).status.success().then_some(())
        });
        d
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.dir.join("docker.sock").display()))
            .args(args)
            .output()
            .expect("docker (Debian package docker.io)")
    }

    /// Trusts `ca` for the registry at `addr`, where the daemon looks for it.
    fn trust(&mut self, addr: SocketAddr, ca: &std::path::Path) {
        let d = PathBuf::from(format!("/etc/docker/certs.d/{addr}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(ca, d.join("ca.crt")).unwrap();
        self.trusted = Some(d);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(d) = &self.trusted {
            let _ = std::fs::remove_dir_all(d);
            // The directories made for it, when nothing else is in them.
            let _ = std::fs::remove_dir("/etc/docker/certs.d");
            let _ = std::fs::remove_dir("/etc/docker");
        }
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // What the daemon left mounted under its roots, deepest first.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(self.dir.to_str().unwrap()))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_docker_daemon_pulls_over_the_routers_tls_with_the_ca_in_certs_d() {
    let TlsBed {
        seeded,
        pki,
        router,
        bed: _bed,
    } = tls_bed(
        "docker",
        "dockerhub/library/busybox",
        testbed::SeedKind::DockerSchema2,
        8192,
        &[],
    );
    let mut docker = Dockerd::start();
    let image = format!("{}/proxy/library/busybox:v1", router.addr);
    // The daemon always counts 127.0.0.0/8 as an insecure registry, for which it still speaks
    // HTTPS first but skips verifying the certificate: the CA is where a node would put it, and the
    // router's port speaks nothing but TLS, so a pull that works came over TLS.
    docker.trust(router.addr, &pki.ca_file());
    let out = docker.docker(&["pull", &image]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        docker.log()
    );
    let out = docker.docker(&[
        "image",
        "inspect",
        "--format",
        "{{index .RepoDigests 0}}",
        &image,
    ]);
    let repo_digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        repo_digest,
        format!("{}/proxy/library/busybox@{}", router.addr, seeded.digest),
        "the registry's digest"
    );
    let m = router.scrape();
    let tls = m[r#"harbor_router_tls_connections_total{protocol="h2"}"#]
        + m[r#"harbor_router_tls_connections_total{protocol="http/1.1"}"#];
    assert!(tls >= 1.0, "the pull came over TLS");
    assert_eq!(m["harbor_router_tls_handshake_failures_total"], 0.0);
    assert_eq!(
        m.get(r#"harbor_router_requests_total{endpoint="blob",method="GET",status="2xx"}"#),
        Some(&2.0),
        "its config and layer, through the router"
    );
}

/// An HTTP/2 frame: type, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

/// A minimal HTTP/2 client over a TLS connection that negotiated `h2`: enough to open streams
/// with a small window and to watch what the server sends.
struct H2Client {
    tls: Tls,
    buf: Vec<u8>,
}

impl H2Client {
    /// The connection preface and SETTINGS with `window` as every stream's initial window.
    fn open(tls: Tls, window: u32) -> H2Client {
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"h2"[..]));
        let mut c = H2Client {
            tls,
            buf: Vec::new(),
        };
        c.tls
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .unwrap();
        // SETTINGS_INITIAL_WINDOW_SIZE (4).
        let mut settings = vec![0, 4];
        settings.extend_from_slice(&window.to_be_bytes());
        c.send(4, 0, 0, &settings);
        c
    }

    fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        self.tls.write_all(&f).unwrap();
        self.tls.flush().unwrap();
    }

    /// A GET of `path` on `stream` (HPACK literals without indexing, no Huffman).
    fn get(&mut self, stream: u32, path: &str) {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "t"),
            (":path", path),
        ] {
            block.push(0);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        // END_STREAM | END_HEADERS.
        self.send(1, 0x5, stream, &block);
    }

    /// The next frame, acknowledging the server's SETTINGS and PINGs; `None` once the server closed.
    fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
                    let frame = (f[3], f[4], stream, f[9..].to_vec());
                    if frame.0 == 4 && frame.1 & 1 == 0 {
                        self.send(4, 1, 0, &[]);
                    }
                    if frame.0 == 6 && frame.1 & 1 == 0 {
                        self.send(6, 1, 0, &frame.3);
                    }
                    return Some(frame);
                }
            }
            let mut chunk = [0u8; 16384];
            match self.tls.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[test]
fn http2_connections_are_closed_when_idle_and_when_a_stream_takes_nothing() {
    let TlsBed {
        bed,
        seeded,
        pki,
        router,
    } = tls_bed(
        "h2",
        "dockerhub/library/big",
        testbed::SeedKind::OciManifest,
        4 << 20,
        &[
            ("HEADER_READ_TIMEOUT", "1s"),
            ("CLIENT_STALL_TIMEOUT", "1s"),
        ],
    );
    let h2 = pki.client(&[b"h2"]);

    // A connection with no stream: GOAWAY, then closed.
    let started = std::time::Instant::now();
    let mut idle = H2Client::open(connect(router.addr, h2.clone()), 65535);
    let mut frames = Vec::new();
    let mut settings = Vec::new();
    while let Some(f) = idle.next() {
        if f.0 == 4 && f.1 & 1 == 0 {
            settings = f.3.clone();
        }
        frames.push(f.0);
    }
    assert!(frames.contains(&7), "GOAWAY before the close: {frames:?}");
    // SETTINGS_MAX_CONCURRENT_STREAMS (3) is announced.
    let announced: Vec<(u16, u32)> = settings
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(announced.contains(&(3, 32)), "{announced:?}");
    assert!(
        started.elapsed() < DEADLINE / 2,
        "closed by the router, not by the client's timeout"
    );

    // The layer on a stream whose window the client never opens past 16 KiB.
    let manifest: serde_json::Value = serde_json::from_slice(&curl_h2(
        &pki,
        router.addr,
        &format!("/v2/proxy/library/big/manifests/{}", seeded.digest),
        &seeded.digest,
    ))
    .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let started = std::time::Instant::now();
    let mut stalled = H2Client::open(connect(router.addr, h2.clone()), 16 << 10);
    stalled.get(1, &format!("/v2/proxy/library/big/blobs/{layer}"));
    let (mut data, mut status, mut goaway) = (0usize, None, false);
    while let Some((kind, _, stream, payload)) = stalled.next() {
        match kind {
            0 if stream == 1 => data += payload.len(),
            // The response's head: `:status: 200` is HPACK's static entry 8 (0x88).
            1 if stream == 1 => status = payload.first().copied(),
            7 => goaway = true,
            _ => {}
        }
    }
    assert_eq!(status, Some(0x88), "the blob's 200");
    assert_eq!(data, 16 << 10, "exactly the window it opened");
    assert!(
        !goaway,
        "cut for the stall, not closed as idle (which says GOAWAY)"
    );
    assert!(
        started.elapsed() < DEADLINE / 2,
        "cut by the router after CLIENT_STALL_TIMEOUT, not by the client's timeout"
    );
    // A request the client cancels (RST_STREAM) before its answer: the connection is idle again,
    // and closed as idle.
    let held = bed.harbor.hold("dockerhub");
    let started = std::time::Instant::now();
    let mut cancels = H2Client::open(connect(router.addr, h2.clone()), 65535);
    let before = bed
        .harbor
        .counters()
        .v2_requests
        .get("dockerhub")
        .copied()
        .unwrap_or(0);
    cancels.get(1, "/v2/proxy/library/big/manifests/v1");
    wait_until("the request reached Harbor", || {
        bed.harbor
            .counters()
            .v2_requests
            .get("dockerhub")
            .copied()
            .unwrap_or(0)
            > before
    });
    // RST_STREAM, CANCEL (8).
    cancels.send(3, 0, 1, &8u32.to_be_bytes());
    let mut goaway = false;
    while let Some((kind, ..)) = cancels.next() {
        goaway |= kind == 7;
    }
    held.release();
    assert!(goaway, "closed as idle");
    assert!(
        started.elapsed() < DEADLINE / 2,
        "a cancelled request does not keep the connection busy"
    );

    // A stream the client reads goes on: the same blob, whole, on a fresh connection (curl).
    curl_h2(
        &pki,
        router.addr,
        &format!("/v2/proxy/library/big/blobs/{layer}"),
        &layer,
    );
}
