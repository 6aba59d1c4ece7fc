//! Token signing keys: an ECDSA P-256 key, a self-signed certificate the registry trusts through
//! `auth.token.rootcertbundle`, and the ES256 JWT signer and verifier the stand-in uses (its token
//! service signs the tokens clients get; its `/v2/` front checks them, as Harbor's core does).
//!
//! distribution 2.8 finds the verification key by the JWT header's `kid`, which must equal the libtrust
//! key id of a key in the root bundle: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32
//! without padding, in 12 groups of 4 joined by `:`. This module does not know about HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use sha2::{Digest, Sha256};

/// The issuer written into the registry config and into every token.
pub const ISSUER: &str = "harbor-token-issuer";

/// Signing key + self-signed cert (PEM on disk) shared by the stand-in and the registry.
#[derive(Clone)]
pub struct TokenKeys {
    /// ring's signer for ES256 (fixed-length r||s signatures, as JWS wants).
    signer: Arc<EcdsaKeyPair>,
    /// libtrust key id, the JWT `kid`.
    kid: String,
    /// The certificate PEM the registry loads as its root bundle (empty for an [`ephemeral`] key).
    ///
    /// [`ephemeral`]: TokenKeys::ephemeral
    cert_path: PathBuf,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys").field("kid", &self.kid).finish()
    }
}

impl TokenKeys {
    /// Generates a key and a self-signed certificate; writes `token-cert.pem` into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<TokenKeys> {
        let (key, mut keys) = TokenKeys::new_key()?;
        let params = rcgen::CertificateParams::new(vec!["harbor-token".to_string()])?;
        let cert = params.self_signed(&key).context("self-sign token cert")?;
        keys.cert_path = dir.join("token-cert.pem");
        std::fs::write(&keys.cert_path, cert.pem())
            .with_context(|| format!("write {}", keys.cert_path.display()))?;
        Ok(keys)
    }

    /// A key that lives in memory only (no certificate on disk): the stand-in's signing key after a
    /// rotation, which the registry behind it never needs to trust.
    pub fn ephemeral() -> anyhow::Result<TokenKeys> {
        Ok(TokenKeys::new_key()?.1)
    }

    /// A new P-256 key, and the keys that sign with it (no certificate yet).
    fn new_key() -> anyhow::Result<(rcgen::KeyPair, TokenKeys)> {
        let key = rcgen::KeyPair::generate().context("generate P-256 key")?;
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("load signing key: {e}"))?;
        let keys = TokenKeys {
            signer: Arc::new(signer),
            kid: libtrust_key_id(&key.public_key_der()),
            cert_path: PathBuf::new(),
        };
        Ok((key, keys))
    }

    /// Path of the certificate PEM (the registry's `rootcertbundle`).
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The libtrust key id used as JWT `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `claims` as a compact ES256 JWT with this key's `kid`.
    pub fn sign_jwt(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing_input = format!(
            "{}.{}",
            b64.encode(serde_json::to_vec(&header)?),
            b64.encode(serde_json::to_vec(claims)?)
        );
        let sig = self
            .signer
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|e| anyhow::anyhow!("sign token: {e}"))?;
        Ok(format!("{signing_input}.{}", b64.encode(sig.as_ref())))
    }

    /// The claims of `token` when it is a compact ES256 JWT signed by this key (with this key's
    /// `kid`); `None` for anything else. Times and audience are the caller's to check.
    pub fn verify_jwt(&self, token: &str) -> Option<serde_json::Value> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = token.split('.');
        let (header, claims, sig) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let head: serde_json::Value = serde_json::from_slice(&b64.decode(header).ok()?).ok()?;
        if head.get("alg")?.as_str()? != "ES256" || head.get("kid")?.as_str()? != self.kid {
            return None;
        }
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.signer.public_key());
        let signing_input = &token[..header.len() + 1 + claims.len()];
        public
            .verify(signing_input.as_bytes(), &b64.decode(sig).ok()?)
            .ok()?;
        serde_json::from_slice(&b64.decode(claims).ok()?).ok()
    }
}

/// libtrust's key id: base32(sha256(spki_der)[..30]) in groups of four joined by ':'.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    let hash = Sha256::digest(spki_der);
    let encoded = base32_nopad(&hash[..30]);
    let groups: Vec<&str> = (0..encoded.len())
        .step_by(4)
        .map(|i| &encoded[i..(i + 4).min(encoded.len())])
        .collect();
    groups.join(":")
}

/// RFC 4648 base32 (upper-case alphabet), no padding.
fn base32_nopad(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32_nopad(b"f"), "MY");
        assert_eq!(base32_nopad(b"fooba"), "MZXW6YTB");
        assert_eq!(base32_nopad(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn tokens_verify_only_with_their_key() {
        let key = TokenKeys::ephemeral().unwrap();
        let other = TokenKeys::ephemeral().unwrap();
        let claims = serde_json::json!({"sub": "robot$x", "n": 1});
        let token = key.sign_jwt(&claims).unwrap();
        assert_eq!(key.verify_jwt(&token), Some(claims));
        assert_eq!(other.verify_jwt(&token), None, "another key's token");
        let mut forged = token.clone();
        forged.insert(token.find('.').unwrap() + 2, 'x');
        assert_eq!(key.verify_jwt(&forged), None, "changed claims");
        assert_eq!(key.verify_jwt("a.b"), None);
        assert_eq!(key.verify_jwt(""), None);
    }

    #[test]
    fn key_id_has_twelve_groups_of_four() {
        let id = libtrust_key_id(b"anything");
        assert_eq!(id.len(), 48 + 11);
        assert_eq!(id.split(':').count(), 12);
        assert!(id.split(':').all(|g| g.len() == 4));
    }
}
