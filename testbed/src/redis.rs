//! Real Redis for the sharing tests: a master, a replica and three Sentinels (Debian's
//! `redis-server` and `redis-sentinel`), each a child process on a free loopback port, in a temporary
//! directory, stopped by PID when the set is dropped. Commands go through `redis-cli`. A set may
//! speak only TLS (`tls-port`, no plain port; replication and the Sentinels' links in TLS too) with
//! a certificate from a private CA of its own, for the IP address 127.0.0.1 alone: what Sentinel
//! names the master by.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The master name the Sentinels monitor.
pub const MASTER_NAME: &str = "mymaster";
/// How long Sentinels wait before they call a silent master down (short, so failover tests are).
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

/// One Redis process.
pub struct Node {
    pub port: u16,
    child: Child,
    /// Stopped with SIGSTOP and not yet continued.
    frozen: bool,
}

impl Node {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.frozen {
            self.signal("CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A master, a replica and three Sentinels.
pub struct RedisSet {
    pub password: Option<String>,
    /// `[master, replica]` as started (after a failover the roles swap).
    pub servers: Vec<Node>,
    pub sentinels: Vec<Node>,
    dir: tempfile::TempDir,
    /// Servers start in cluster mode.
    cluster: bool,
    /// Every process speaks TLS only, with these files.
    tls: Option<TlsFiles>,
}

/// A private CA and the certificate it signed for the set's processes (PEM files).
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    fn generate(dir: &Path) -> anyhow::Result<TlsFiles> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            DnType::CommonName,
            format!("testbed Redis CA {}", dir.display()),
        );
        let ca = params.self_signed(&ca_key)?;
        // The IP address only: a client that connects by a host name (`localhost`) must refuse it.
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        params.distinguished_name.push(DnType::CommonName, "redis");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("redis.pem"),
            key: dir.join("redis.key"),
        };
        std::fs::write(&files.ca, ca.pem())?;
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }

    /// The server options that make a process speak TLS only, on `port`.
    fn server_args(&self, port: u16) -> Vec<String> {
        let mut args: Vec<String> = ["--port", "0", "--tls-port"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(port.to_string());
        for (k, v) in [
            ("--tls-cert-file", &self.cert),
            ("--tls-key-file", &self.key),
            ("--tls-ca-cert-file", &self.ca),
        ] {
            args.push(k.into());
            args.push(v.display().to_string());
        }
        args.extend(
            ["--tls-auth-clients", "no", "--tls-replication", "yes"]
                .iter()
                .map(|s| s.to_string()),
        );
        args
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl RedisSet {
    /// Starts the set and waits until the replica is in sync and every Sentinel knows the others.
    pub fn start(password: Option<&str>) -> anyhow::Result<RedisSet> {
        Self::start_with(password, false)
    }

    /// [`RedisSet::start`], every process speaking TLS only.
    pub fn start_tls(password: Option<&str>) -> anyhow::Result<RedisSet> {
        Self::start_with(password, true)
    }

    fn start_with(password: Option<&str>, tls: bool) -> anyhow::Result<RedisSet> {
        let mut set = RedisSet::none_yet(password, false, tls)?;
        let master = set.server(None)?;
        let master_port = master.port;
        set.servers.push(master);
        let replica = set.server(Some(master_port))?;
        set.servers.push(replica);
        set.wait("the replica is in sync", |s| {
            s.cli(s.servers[1].port, &["INFO", "replication"])
                .is_ok_and(|o| o.contains("master_link_status:up"))
        })?;
        for i in 0..3 {
            let node = set.sentinel(i, master_port)?;
            set.sentinels.push(node);
        }
        set.wait(
            "every Sentinel knows the replica and the other Sentinels",
            |s| {
                s.sentinels.iter().all(|n| {
                    s.cli(n.port, &["SENTINEL", "MASTER", MASTER_NAME])
                        .is_ok_and(|o| {
                            field(&o, "num-other-sentinels") == Some("2")
                                && field(&o, "num-slaves") == Some("1")
                        })
                })
            },
        )?;
        Ok(set)
    }

    /// One server and nothing else (a managed Redis's endpoint, as `REDIS_URL` names it).
    pub fn standalone(password: Option<&str>) -> anyhow::Result<RedisSet> {
        Self::alone(password, false, false)
    }

    /// [`RedisSet::standalone`] speaking TLS only (a managed Redis with in-transit encryption).
    pub fn standalone_tls(password: Option<&str>) -> anyhow::Result<RedisSet> {
        Self::alone(password, false, true)
    }

    /// One server in cluster mode (`cluster-enabled yes`, no slots): what a cluster-mode managed
    /// service's endpoint is to a client.
    pub fn cluster_node() -> anyhow::Result<RedisSet> {
        Self::alone(None, true, false)
    }

    fn alone(password: Option<&str>, cluster: bool, tls: bool) -> anyhow::Result<RedisSet> {
        let mut set = RedisSet::none_yet(password, cluster, tls)?;
        let server = set.server(None)?;
        set.servers.push(server);
        Ok(set)
    }

    /// A set with its directory and no process yet.
    fn none_yet(password: Option<&str>, cluster: bool, tls: bool) -> anyhow::Result<RedisSet> {
        let dir = tempfile::Builder::new()
            .prefix("testbed-redis-")
            .tempdir()?;
        let tls = match tls {
            true => Some(TlsFiles::generate(dir.path())?),
            false => None,
        };
        Ok(RedisSet {
            password: password.map(str::to_string),
            servers: Vec::new(),
            sentinels: Vec::new(),
            dir,
            cluster,
            tls,
        })
    }

    /// `redis://127.0.0.1:<port>` of the first server (the standalone one); `rediss://` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.servers[0].port)
    }

    /// The CA that signed the set's certificate (PEM), when it speaks TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    /// `kill -9` of the server on `port`, then a new one on the same port, empty: a managed
    /// Redis's endpoint after a restart.
    pub fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        let node = self.server_on(port);
        let _ = node.child.kill();
        let _ = node.child.wait();
        let deadline = Instant::now() + Duration::from_secs(20);
        let fresh = loop {
            match self.server_on_port(port, None) {
                Ok(n) => break n,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let i = self
            .servers
            .iter()
            .position(|n| n.port == port)
            .expect("ours");
        self.servers[i] = fresh;
        self.wait("the restarted server answers", |s| {
            s.cli(port, &["PING"]).is_ok_and(|o| o.contains("PONG"))
        })
    }

    /// Starts `make(port)` on a free port and waits until the process answering there is the one
    /// started (another test may take a port between its release and Redis's bind): a few tries.
    fn start_on_free_port(
        &self,
        sentinel: bool,
        make: impl Fn(u16) -> anyhow::Result<Node>,
    ) -> anyhow::Result<Node> {
        for _ in 0..5 {
            let port = free_port()?;
            let mut node = make(port)?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let pid = self
                    .cli_as(port, !sentinel, &["INFO", "server"])
                    .ok()
                    .and_then(|o| field_colon(&o, "process_id").map(str::to_string));
                if pid == Some(node.pid().to_string()) {
                    return Ok(node);
                }
                if node.child.try_wait()?.is_some() {
                    break; // lost the port to another process: try another
                }
                if Instant::now() > deadline {
                    bail!("redis on port {port} did not start");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        bail!("no free port for redis after 5 tries")
    }

    fn server(&self, replica_of: Option<u16>) -> anyhow::Result<Node> {
        self.start_on_free_port(false, |port| self.server_on_port(port, replica_of))
    }

    fn server_on_port(&self, port: u16, replica_of: Option<u16>) -> anyhow::Result<Node> {
        let data = self.dir.path().join(format!("server-{port}"));
        std::fs::create_dir_all(&data)?;
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            Some(tls) => cmd.args(tls.server_args(port)),
            None => cmd.args(["--port", &port.to_string()]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&data);
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw, "--masterauth", pw]);
        }
        if let Some(m) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
        }
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(data.join("nodes.conf"));
        }
        spawn(cmd, &data.join("log"), port)
    }

    fn sentinel(&self, i: usize, master_port: u16) -> anyhow::Result<Node> {
        self.start_on_free_port(true, |port| self.sentinel_on_port(i, port, master_port))
    }

    fn sentinel_on_port(&self, i: usize, port: u16, master_port: u16) -> anyhow::Result<Node> {
        let dir = self.dir.path().join(format!("sentinel-{i}"));
        std::fs::create_dir_all(&dir)?;
        let mut conf = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} {}\nsentinel failover-timeout {MASTER_NAME} 10000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            dir.display(),
            DOWN_AFTER.as_millis()
        );
        if let Some(pw) = &self.password {
            conf.push_str(&format!("sentinel auth-pass {MASTER_NAME} {pw}\n"));
        }
        if let Some(tls) = &self.tls {
            // The same options as a server's, in the file: `port 0`, the TLS port, the files.
            conf = conf.replacen(&format!("port {port}\n"), "", 1);
            for pair in tls.server_args(port).chunks(2) {
                conf.push_str(&format!(
                    "{} {}\n",
                    pair[0].trim_start_matches("--"),
                    pair[1]
                ));
            }
        }
        let file = dir.join("sentinel.conf");
        std::fs::write(&file, conf)?;
        let mut cmd = Command::new("redis-sentinel");
        cmd.arg(&file);
        spawn(cmd, &dir.join("log"), port)
    }

    /// Polls `f` every 20 ms for up to 30 s.
    pub fn wait(&self, what: &str, f: impl Fn(&RedisSet) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f(self) {
            if Instant::now() > deadline {
                bail!("never happened: {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `REDIS_SENTINELS` for these Sentinels.
    pub fn sentinels_env(&self) -> String {
        self.sentinels
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `redis-cli` against `port` (with the password for servers); its output.
    pub fn cli(&self, port: u16, args: &[&str]) -> anyhow::Result<String> {
        let is_sentinel = self.sentinels.iter().any(|n| n.port == port);
        self.cli_as(port, !is_sentinel, args)
    }

    fn cli_as(&self, port: u16, auth: bool, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &port.to_string(), "--no-auth-warning"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--tls").arg("--cacert").arg(&tls.ca);
        }
        if let (Some(pw), true) = (&self.password, auth) {
            cmd.args(["-a", pw]);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("redis-cli")?;
        if !out.status.success() {
            bail!(
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The master's port as the Sentinels report it.
    pub fn master_port(&self) -> anyhow::Result<u16> {
        let out = self.cli(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        )?;
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .context("no master address")
    }

    /// Runs a command on the current master.
    pub fn master_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        self.cli(self.master_port()?, args)
    }

    /// The server process listening on `port`.
    pub fn server_on(&mut self, port: u16) -> &mut Node {
        self.servers
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a server of this set")
    }

    /// `kill -9` of the current master; returns its port.
    pub fn kill_master(&mut self) -> anyhow::Result<u16> {
        let port = self.master_port()?;
        let node = self.server_on(port);
        let _ = node.child.kill();
        let _ = node.child.wait();
        Ok(port)
    }

    /// SIGSTOP of the current master (continued by [`RedisSet::thaw`] or on drop); returns its port.
    pub fn freeze_master(&mut self) -> anyhow::Result<u16> {
        let port = self.master_port()?;
        self.freeze(port);
        Ok(port)
    }

    /// SIGSTOP of the server on `port` (continued by [`RedisSet::thaw`] or on drop).
    pub fn freeze(&mut self, port: u16) {
        let node = self.server_on(port);
        node.signal("STOP");
        node.frozen = true;
    }

    pub fn thaw(&mut self, port: u16) {
        let node = self.server_on(port);
        node.signal("CONT");
        node.frozen = false;
    }

    /// Waits until the Sentinels name a master other than `old` and it accepts writes.
    pub fn wait_failover(&self, old: u16) -> anyhow::Result<u16> {
        self.wait("Sentinel promotes the replica", |s| {
            s.master_port().is_ok_and(|p| {
                p != old && s.cli(p, &["ROLE"]).is_ok_and(|r| r.starts_with("master"))
            })
        })?;
        self.master_port()
    }

    /// Commands of `name` (lower case, e.g. `get`) the server on `port` has run.
    pub fn calls(&self, port: u16, name: &str) -> anyhow::Result<u64> {
        let out = self.cli(port, &["INFO", "commandstats"])?;
        let prefix = format!("cmdstat_{name}:calls=");
        Ok(out
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A `key:value` line of an `INFO` answer.
fn field_colon<'a>(out: &'a str, name: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// A `key:value` field of `SENTINEL MASTER`'s flat answer (one item per line).
fn field<'a>(out: &'a str, name: &str) -> Option<&'a str> {
    let mut lines = out.lines();
    while let Some(l) = lines.next() {
        if l == name {
            return lines.next();
        }
    }
    None
}

fn spawn(mut cmd: Command, log: &PathBuf, port: u16) -> anyhow::Result<Node> {
    let out = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?} (is Redis installed?)"))?;
    Ok(Node {
        port,
        child,
        frozen: false,
    })
}
