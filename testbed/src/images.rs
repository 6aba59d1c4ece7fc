//! Test images without Docker: builds OCI image layouts in Rust (random gzip'd tar layer, config,
//! manifest or index/list, `index.json`, `oci-layout`) and pushes them with `skopeo copy --all
//! --preserve-digests`, keeping OCI and Docker media types as built.
//!
//! Does not start anything; `Testbed::seed` (lib.rs) calls [`build_layout`] and [`push`].

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Every manifest media type, for `Accept`.
pub const ALL_MANIFEST_TYPES: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Which manifest shape to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedKind {
    OciManifest,
    DockerSchema2,
    /// Two platforms: linux/amd64 and linux/arm64.
    OciIndex,
    /// Two platforms: linux/amd64 and linux/arm64.
    DockerManifestList,
}

impl SeedKind {
    /// The media type of the top-level manifest.
    pub fn media_type(self) -> &'static str {
        match self {
            SeedKind::OciManifest => OCI_MANIFEST,
            SeedKind::DockerSchema2 => DOCKER_MANIFEST,
            SeedKind::OciIndex => OCI_INDEX,
            SeedKind::DockerManifestList => DOCKER_LIST,
        }
    }
}

/// An image to build and push.
#[derive(Debug, Clone)]
pub struct SeedImage {
    /// Full path including the project, e.g. `dockerhub/library/nginx`.
    pub repository: String,
    pub tag: String,
    pub kind: SeedKind,
    /// Size of the one random file in each layer.
    pub layer_bytes: usize,
}

/// What was pushed, as the registry reports it.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub repository: String,
    pub tag: String,
    /// `Docker-Content-Digest` of `GET /v2/<repository>/manifests/<tag>`.
    pub digest: String,
    pub media_type: String,
    /// Digests of every config and layer blob (all platforms).
    pub blobs: Vec<String>,
}

/// A built layout: its top-level manifest digest and the blobs below it.
#[derive(Debug)]
pub struct Built {
    pub digest: String,
    /// Per-platform manifest digests of an index/list (empty for a single manifest).
    pub instances: Vec<String>,
    /// Where skopeo reads it from: `oci:<dir>:<tag>` or, for Docker media types, `dir:<dir>/dir`.
    pub source: String,
    pub media_type: &'static str,
    pub blobs: Vec<String>,
}

fn write_blob(dir: &Path, data: &[u8]) -> anyhow::Result<(String, usize)> {
    let hex = format!("{:x}", Sha256::digest(data));
    std::fs::write(dir.join("blobs/sha256").join(&hex), data)?;
    Ok((format!("sha256:{hex}"), data.len()))
}

fn descriptor(media_type: &str, (digest, size): &(String, usize)) -> Value {
    json!({"mediaType": media_type, "digest": digest, "size": size})
}

/// Builds one single-platform image; returns the manifest descriptor and the blob digests.
fn platform_image(
    dir: &Path,
    docker: bool,
    arch: &str,
    layer_bytes: usize,
) -> anyhow::Result<(Value, Vec<String>)> {
    let mut payload = vec![0u8; layer_bytes];
    rand::thread_rng().fill_bytes(&mut payload);
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(payload.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, "data.bin", payload.as_slice())?;
    let tar = tar.into_inner()?;
    let diff_id = format!("sha256:{:x}", Sha256::digest(&tar));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    let layer = write_blob(dir, &gz.finish()?)?;
    let config = json!({
        "created": "2024-01-01T00:00:00Z", "architecture": arch, "os": "linux",
        "config": {"Cmd": ["/data.bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "testbed"}],
    });
    let config = write_blob(dir, &serde_json::to_vec(&config)?)?;
    let (mt, config_mt, layer_mt) = if docker {
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
    } else {
        (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
    };
    let manifest = json!({
        "schemaVersion": 2, "mediaType": mt,
        "config": descriptor(config_mt, &config),
        "layers": [descriptor(layer_mt, &layer)],
    });
    let manifest = write_blob(dir, &serde_json::to_vec(&manifest)?)?;
    let mut desc = descriptor(mt, &manifest);
    desc["platform"] = json!({"architecture": arch, "os": "linux"});
    Ok((desc, vec![config.0, layer.0]))
}

/// Writes an OCI image layout for `image` into `dir` (tagged `image.tag` in `index.json`).
pub fn build_layout(dir: &Path, image: &SeedImage) -> anyhow::Result<Built> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let docker = matches!(
        image.kind,
        SeedKind::DockerSchema2 | SeedKind::DockerManifestList
    );
    let media_type = image.kind.media_type();
    let mut instances = Vec::new();
    let (top, blobs) = match image.kind {
        SeedKind::OciManifest | SeedKind::DockerSchema2 => {
            let (mut desc, blobs) = platform_image(dir, docker, "amd64", image.layer_bytes)?;
            desc.as_object_mut().map(|o| o.remove("platform"));
            (desc, blobs)
        }
        SeedKind::OciIndex | SeedKind::DockerManifestList => {
            let mut manifests = Vec::new();
            let mut blobs = Vec::new();
            for arch in ["amd64", "arm64"] {
                let (desc, b) = platform_image(dir, docker, arch, image.layer_bytes)?;
                instances.push(desc["digest"].as_str().unwrap_or_default().to_string());
                manifests.push(desc);
                blobs.extend(b);
            }
            let index =
                json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests});
            let index = write_blob(dir, &serde_json::to_vec(&index)?)?;
            (descriptor(media_type, &index), blobs)
        }
    };
    let digest = top["digest"].as_str().unwrap_or_default().to_string();
    let mut tagged = top;
    tagged["annotations"] = json!({"org.opencontainers.image.ref.name": image.tag});
    let index = json!({"schemaVersion": 2, "manifests": [tagged]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    let source = if docker {
        // containers/image's oci: transport only takes OCI media types in index.json; its dir:
        // transport guesses the type from the manifest itself, so Docker lists stay Docker lists.
        let d = dir.join("dir");
        write_dir_transport(dir, &d, &digest, &instances, &blobs)?;
        format!("dir:{}", d.display())
    } else {
        format!("oci:{}:{}", dir.display(), image.tag)
    };
    Ok(Built {
        digest,
        instances,
        source,
        media_type,
        blobs,
    })
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// skopeo's `dir:` layout (version 1.1): `manifest.json`, `<hex>.manifest.json` per instance,
/// one file per blob named by its hex digest.
fn write_dir_transport(
    layout: &Path,
    d: &Path,
    top: &str,
    instances: &[String],
    blobs: &[String],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(d)?;
    std::fs::write(d.join("version"), "Directory Transport Version: 1.1\n")?;
    let blob = |digest: &str| layout.join("blobs/sha256").join(hex(digest));
    std::fs::copy(blob(top), d.join("manifest.json"))?;
    for m in instances {
        std::fs::copy(blob(m), d.join(format!("{}.manifest.json", hex(m))))?;
    }
    for b in blobs {
        std::fs::copy(blob(b), d.join(hex(b)))?;
    }
    Ok(())
}

/// `skopeo copy --all --preserve-digests` of a built layout to `registry/<repository>:<tag>`.
pub fn push(
    built: &Built,
    image: &SeedImage,
    registry: SocketAddr,
    creds: &str,
) -> anyhow::Result<()> {
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .args(["--dest-creds", creds])
        .arg(&built.source)
        .arg(format!(
            "docker://{registry}/{}:{}",
            image.repository, image.tag
        ))
        .output()
        .context("run skopeo (Debian package skopeo)")?;
    if !out.status.success() {
        bail!(
            "skopeo copy to {}:{} failed ({}): {}",
            image.repository,
            image.tag,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
