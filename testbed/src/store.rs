//! What Harbor holds locally: its proxy cache, modelled as what was fetched through the stand-in,
//! and the trimmed multi-arch index Harbor keeps under a tag.
//!
//! Harbor's rules (goharbor/harbor main, checked against v2.15):
//! - `src/controller/proxy/controller.go` (`ProxyManifest`, `ProxyBlob`, `putBlobToLocal`): a
//!   manifest or blob fetched from the upstream is copied to the local registry in the background;
//!   a single manifest fetched by tag is kept by tag and by digest.
//! - `src/controller/proxy/manifestcache.go` (`ManifestListCache.push`, `updateManifestList`): an
//!   index (OCI index or Docker manifest list) is kept as a *new* index of the children that reached
//!   the local store, re-serialised by `manifestlist.FromDescriptors` (`json.MarshalIndent` with
//!   three spaces, index annotations dropped, media type OCI when the first child is an OCI
//!   manifest, else Docker's list), under the tag (or under its own new digest when fetched by
//!   digest): the index's original digest is never held locally.
//!
//! The stand-in records a manifest on a successful GET (by tag: the digest it resolved to) and a
//! blob on a successful GET, and computes the trimmed index when a tag is served from the local
//! store, from the children fetched by digest so far (Harbor computes it once, after waiting for
//! them); with no child fetched, the original index is served.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::images::{DOCKER_LIST, OCI_INDEX, OCI_MANIFEST};
use crate::Cached;

/// `(project, repository inside the project, reference)`.
pub(crate) type Key = (String, String, String);

/// What a tag resolved to when it was fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub digest: String,
    pub media_type: String,
}

/// A manifest the stand-in serves from memory (a trimmed index: the registry does not hold it).
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    pub media_type: String,
    pub digest: String,
    pub body: Bytes,
}

/// Harbor's local store.
#[derive(Default)]
pub(crate) struct Store {
    tags: HashMap<Key, Resolved>,
    manifests: HashSet<Key>,
    trimmed: HashMap<Key, Kept>,
    blobs: HashSet<(String, String)>,
}

fn key(project: &str, repository: &str, reference: &str) -> Key {
    (
        project.to_string(),
        repository.to_string(),
        reference.to_string(),
    )
}

/// Whether `media_type` is an index (OCI index or Docker manifest list).
pub(crate) fn is_index(media_type: &str) -> bool {
    let mt = media_type.split(';').next().unwrap_or("").trim();
    mt == OCI_INDEX || mt == DOCKER_LIST
}

impl Store {
    pub fn tag(&self, project: &str, repository: &str, tag: &str) -> Option<Resolved> {
        self.tags.get(&key(project, repository, tag)).cloned()
    }

    /// Whether the local store holds this manifest by digest.
    pub fn holds_manifest(&self, project: &str, repository: &str, digest: &str) -> bool {
        let k = key(project, repository, digest);
        self.manifests.contains(&k) || self.trimmed.contains_key(&k)
    }

    /// A trimmed index held by this digest.
    pub fn trimmed(&self, project: &str, repository: &str, digest: &str) -> Option<Kept> {
        self.trimmed.get(&key(project, repository, digest)).cloned()
    }

    /// Whether Harbor knows the repository: some manifest of it was stored.
    pub fn holds_repository(&self, project: &str, repository: &str) -> bool {
        let of = |k: &Key| k.0 == project && k.1 == repository;
        self.tags.keys().any(of) || self.manifests.iter().any(of) || self.trimmed.keys().any(of)
    }

    /// The repository's local tags (unsorted).
    pub fn tags_of(&self, project: &str, repository: &str) -> Vec<String> {
        self.tags
            .keys()
            .filter(|k| k.0 == project && k.1 == repository)
            .map(|k| k.2.clone())
            .collect()
    }

    /// A manifest GET answered 200 by the upstream: kept by tag (with what it resolved to) and, but
    /// for an index, by digest.
    pub fn record_manifest(
        &mut self,
        project: &str,
        repository: &str,
        reference: &str,
        digest: &str,
        media_type: &str,
    ) {
        if !reference.contains(':') {
            let resolved = Resolved {
                digest: digest.to_string(),
                media_type: media_type.to_string(),
            };
            self.tags
                .insert(key(project, repository, reference), resolved);
        }
        if !is_index(media_type) {
            self.manifests.insert(key(project, repository, digest));
        }
    }

    /// A trimmed index Harbor would hold under its own digest.
    pub fn keep_trimmed(&mut self, project: &str, repository: &str, kept: Kept) {
        let k = key(project, repository, &kept.digest);
        self.trimmed.insert(k, kept);
    }

    pub fn holds_blob(&self, project: &str, digest: &str) -> bool {
        self.blobs
            .contains(&(project.to_string(), digest.to_string()))
    }

    pub fn record_blob(&mut self, project: &str, digest: &str) {
        self.blobs.insert((project.to_string(), digest.to_string()));
    }

    pub fn snapshot(&self) -> Cached {
        Cached {
            tags: self
                .tags
                .iter()
                .map(|(k, r)| (k.clone(), r.digest.clone()))
                .collect(),
            manifests: self
                .manifests
                .iter()
                .chain(self.trimmed.keys())
                .cloned()
                .collect(),
            blobs: self.blobs.iter().cloned().collect(),
        }
    }

    pub fn clear(&mut self) {
        *self = Store::default();
    }
}

/// One entry of an index as `manifestlist.ManifestDescriptor` marshals it: the descriptor's
/// fields, then `platform` (always present).
#[derive(Debug, Serialize, Deserialize)]
struct Child {
    #[serde(
        rename = "mediaType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    media_type: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    size: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Platform,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// `manifestlist.PlatformSpec`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    os_version: String,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    variant: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    features: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Child>,
}

/// `manifestlist.ManifestList` as `FromDescriptors` writes it.
#[derive(Serialize)]
struct Trimmed<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    manifests: Vec<Child>,
}

/// The index Harbor keeps for `original`: only the children `held` (by digest), re-serialised as
/// `manifestlist.FromDescriptors` does. `None` when no child is held or the index does not parse.
pub(crate) fn trim(original: &[u8], held: impl Fn(&str) -> bool) -> Option<Kept> {
    let index: Index = serde_json::from_slice(original).ok()?;
    let kept: Vec<Child> = index
        .manifests
        .into_iter()
        .filter(|c| held(&c.digest))
        .collect();
    if kept.is_empty() {
        return None;
    }
    let media_type = if kept[0].media_type == OCI_MANIFEST {
        OCI_INDEX
    } else {
        DOCKER_LIST
    };
    let list = Trimmed {
        schema_version: 2,
        media_type,
        manifests: kept,
    };
    let mut body = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"   ");
    let mut ser = serde_json::Serializer::with_formatter(&mut body, formatter);
    list.serialize(&mut ser).ok()?;
    Some(Kept {
        media_type: media_type.to_string(),
        digest: sha256_digest(&body),
        body: body.into(),
    })
}

pub(crate) fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_to_the_held_children_as_from_descriptors_does() {
        let original = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "annotations": {"org.example": "dropped"},
            "manifests": [
                {"mediaType": OCI_MANIFEST, "size": 10, "digest": "sha256:aa",
                 "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": OCI_MANIFEST, "size": 11, "digest": "sha256:bb",
                 "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            ]
        });
        let raw = serde_json::to_vec(&original).unwrap();
        assert!(trim(&raw, |_| false).is_none());
        let kept = trim(&raw, |d| d == "sha256:bb").unwrap();
        assert_eq!(kept.media_type, OCI_INDEX);
        assert_eq!(kept.digest, sha256_digest(&kept.body));
        let text = std::str::from_utf8(&kept.body).unwrap();
        assert!(
            text.starts_with("{\n   \"schemaVersion\": 2,\n   \"mediaType\": "),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_slice(&kept.body).unwrap();
        assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(v["manifests"][0]["digest"], "sha256:bb");
        assert_eq!(v["manifests"][0]["platform"]["variant"], "v8");
        assert!(v.get("annotations").is_none());

        // The media type follows the first kept child, as FromDescriptors decides it.
        let docker = raw_list(crate::images::DOCKER_MANIFEST);
        let kept = trim(&docker, |_| true).unwrap();
        assert_eq!(kept.media_type, DOCKER_LIST);
    }

    fn raw_list(child: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": child, "size": 1, "digest": "sha256:cc"}]
        }))
        .unwrap()
    }

    #[test]
    fn an_index_is_held_by_tag_only() {
        let mut s = Store::default();
        s.record_manifest("p", "r", "t", "sha256:ix", OCI_INDEX);
        s.record_manifest("p", "r", "sha256:m1", "sha256:m1", OCI_MANIFEST);
        assert_eq!(s.tag("p", "r", "t").unwrap().digest, "sha256:ix");
        assert!(!s.holds_manifest("p", "r", "sha256:ix"));
        assert!(s.holds_manifest("p", "r", "sha256:m1"));
        assert!(s.holds_repository("p", "r"));
        assert!(!s.holds_repository("p", "other"));
        assert_eq!(s.tags_of("p", "r"), vec!["t".to_string()]);
    }
}
