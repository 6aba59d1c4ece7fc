//! The real registry: `/usr/bin/docker-registry` (CNCF distribution 2.8) as a child process on
//! 127.0.0.1 with token auth trusting [`TokenKeys`], storage in a temp dir, stderr captured to a file.
//!
//! Owns the child's life: [`Registry::start`] waits until `GET /v2/` answers (20 s at most) and
//! [`Drop`] kills and reaps it. Knows nothing of Harbor's quirks (see `proxy.rs`).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::client;
use crate::keys::{TokenKeys, ISSUER};

/// The service name Harbor's token service and registry agree on.
pub const SERVICE: &str = "harbor-registry";

/// Path of the distribution binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running docker-registry child process.
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    /// Keys the registry trusts; the stand-in signs with them.
    keys: TokenKeys,
    /// Holds config, storage and logs; removed on drop (after the child is dead).
    _dir: tempfile::TempDir,
    stderr_path: PathBuf,
}

impl Registry {
    /// Starts the registry with `auth.token.realm = token_realm` and waits until it answers.
    /// Retries with a new port when the one picked was taken in the meantime.
    pub fn start(keys: &TokenKeys, token_realm: &str) -> anyhow::Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("testbed-registry-")
            .tempdir()?;
        let mut attempt = 0;
        loop {
            let port = free_port()?;
            let (mut child, stderr_path) = spawn(dir.path(), port, keys, token_realm, attempt)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match wait_ready(&mut child, addr, &stderr_path, Duration::from_secs(20)) {
                Ok(()) => {
                    return Ok(Registry {
                        child,
                        addr,
                        keys: keys.clone(),
                        _dir: dir,
                        stderr_path,
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    attempt += 1;
                    if !stderr.contains("address already in use") || attempt >= 3 {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The keys the registry trusts.
    pub fn keys(&self) -> &TokenKeys {
        &self.keys
    }

    /// What the registry wrote to stderr so far (for error messages).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET /v2/` until the registry answers 401/200, the child exits, or the budget runs out.
fn wait_ready(
    child: &mut Child,
    addr: SocketAddr,
    stderr_path: &Path,
    budget: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + budget;
    let stderr = || std::fs::read_to_string(stderr_path).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "docker-registry exited ({status}) before answering; stderr:\n{}",
                stderr()
            );
        }
        if let Ok(resp) = client::get(addr, "/v2/", &[]) {
            if resp.status == 401 || resp.status == 200 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "docker-registry on {addr} did not answer GET /v2/ within {budget:?}; stderr:\n{}",
                stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Binds 127.0.0.1:0, reads the port and releases it (the registry binds it right after).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(
    dir: &Path,
    port: u16,
    keys: &TokenKeys,
    realm: &str,
    attempt: u32,
) -> anyhow::Result<(Child, PathBuf)> {
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage)?;
    let config = format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n\
         auth:\n  token:\n    realm: \"{realm}\"\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {cert}\n",
        storage = storage.display(),
        cert = keys.cert_path().display(),
    );
    let config_path = dir.join(format!("config-{attempt}.yml"));
    std::fs::write(&config_path, config)?;
    let stderr_path = dir.join(format!("stderr-{attempt}.log"));
    let stderr = std::fs::File::create(&stderr_path)?;
    let child = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(stderr.try_clone()?)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("spawn {REGISTRY_BIN} (Debian package docker-registry)"))?;
    Ok((child, stderr_path))
}
