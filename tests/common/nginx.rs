//! nginx from Debian as a front for the stand-in Harbor: over TLS, with a CA and a server
//! certificate made by the test (rcgen), so the router must verify Harbor through `HARBOR_CA_FILE`,
//! over HTTP/1.1 or, with ALPN, HTTP/2; or on plain TCP, HTTP/1.1 only (as Harbor's own nginx) or
//! with h2c (HTTP/2 with prior knowledge).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// How the front listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// TLS, with HTTP/2 offered by ALPN.
    Tls,
    /// Plain TCP, HTTP/1.1 only: Harbor's own nginx templates.
    Plain,
    /// Plain TCP with HTTP/2 by prior knowledge (h2c).
    H2c,
}

pub struct TlsFront {
    child: Child,
    pub addr: SocketAddr,
    /// The CA that signed nginx's certificate (PEM file).
    pub ca_file: PathBuf,
    dir: PathBuf,
}

impl TlsFront {
    /// Starts nginx on a free loopback port, terminating TLS for `localhost` and proxying to
    /// `backend` (plain HTTP/1.1).
    pub fn start(backend: SocketAddr) -> TlsFront {
        TlsFront::listening(backend, Listen::Tls)
    }

    /// Starts nginx on a free loopback port, listening as `listen` says, proxying to `backend`
    /// (plain HTTP/1.1).
    pub fn listening(backend: SocketAddr, listen: Listen) -> TlsFront {
        let dir =
            std::env::temp_dir().join(format!("hr-nginx-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let (ca_pem, cert_pem, key_pem) = certificates();
        std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
        std::fs::write(dir.join("server.pem"), cert_pem).unwrap();
        std::fs::write(dir.join("server.key"), key_pem).unwrap();
        // nginx cannot report a port it picked, so pick one, release it, and retry on a clash.
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let directive = match listen {
                Listen::Tls => format!(
                    "listen 127.0.0.1:{port} ssl http2;\n    ssl_certificate {dir}/server.pem;\n    ssl_certificate_key {dir}/server.key;",
                    dir = dir.display()
                ),
                Listen::Plain => format!("listen 127.0.0.1:{port};"),
                Listen::H2c => format!("listen 127.0.0.1:{port} http2;"),
            };
            let conf = format!(
                r#"worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    {directive}
    location / {{
      proxy_pass http://{backend};
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_buffering off;
    }}
  }}
}}
"#,
                dir = dir.display()
            );
            std::fs::write(dir.join("nginx.conf"), conf).unwrap();
            let mut child = Command::new("nginx")
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx (apt-get install nginx-light)");
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port clash or bad config: retry
                }
                if TcpStream::connect(addr).is_ok() {
                    return TlsFront {
                        child,
                        addr,
                        ca_file: dir.join("ca.pem"),
                        dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default();
        panic!("nginx did not start:\n{log}");
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers. (SIGKILL would leave them running, still
        // listening, with no parent.)
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// (CA cert, server cert for localhost/127.0.0.1, server key), PEM.
fn certificates() -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "harbor-router test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut server =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &ca_cert, &ca_key).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}
