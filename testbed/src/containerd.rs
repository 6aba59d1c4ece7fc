//! A real containerd (Debian's `containerd` package) for node-style pulls: a child process with its
//! own root, state directory and socket under a temporary directory (the CRI plugin off), stopped by
//! PID on drop. [`Containerd::pull`] runs `ctr content fetch --hosts-dir`, which resolves and
//! fetches an image (its index or manifest, configs and layers) through the mirrors a hosts
//! directory names, as a node's containerd does, without unpacking it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct Containerd {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Containerd {
    pub fn start() -> anyhow::Result<Containerd> {
        let dir = tempfile::Builder::new()
            .prefix("testbed-containerd-")
            .tempdir()?;
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{socket}\"\n[ttrpc]\n  address = \"{socket}.ttrpc\"\n\
                 [debug]\n  address = \"{socket}.debug\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                socket = socket.display(),
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start containerd (Debian package containerd)")?;
        let c = Containerd { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"])?.status.success() {
            if Instant::now() > deadline {
                bail!("containerd did not start: {}", c.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(c)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// A fresh hosts directory under this containerd's temporary directory.
    pub fn hosts_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        let _ = std::fs::create_dir_all(&d);
        d
    }

    /// `ctr` against this containerd, in namespace `test`.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "test"])
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Fetches `reference` (`docker.io/library/alpine:v1`) through the mirrors `hosts` names; the
    /// digest the image resolved to.
    pub fn pull(&self, hosts: &Path, reference: &str) -> anyhow::Result<String> {
        let out = self.ctr(&[
            "content",
            "fetch",
            "--hosts-dir",
            &hosts.display().to_string(),
            reference,
        ])?;
        if !out.status.success() {
            bail!(
                "ctr content fetch {reference}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let images = self.ctr(&["images", "list"])?;
        let list = String::from_utf8_lossy(&images.stdout).into_owned();
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(reference))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
            .map(str::to_string)
            .with_context(|| format!("{reference} is not in `ctr images list`:\n{list}"))
    }

    /// Forgets every image and its content, so the next pull is cold.
    pub fn forget(&self, reference: &str) {
        let _ = self.ctr(&["images", "rm", "--sync", reference]);
        let _ = self.ctr(&["content", "prune", "references"]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
