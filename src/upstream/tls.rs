//! The rustls client configuration for `https://` HARBOR_URLs: the system's trust store (falling back
//! to the bundled webpki roots when the system has none, as in a scratch image) plus the CA file named
//! by `HARBOR_CA_FILE`, for a Harbor whose certificate comes from a private CA. Built once at start;
//! every core shares it read-only. The link to Redis trusts the same two sources
//! ([`system_certificates`], [`ca_certificates`]).

use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Builds the client config. `offer_h2` adds `h2` to ALPN (before `http/1.1`).
pub fn client_config(ca_file: Option<&str>, offer_h2: bool) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(system_certificates());
    if added == 0 {
        tracing::info!("no system trust store found; using the bundled webpki roots");
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = ca_file {
        for cert in ca_certificates(path, "HARBOR_CA_FILE")? {
            roots
                .add(cert)
                .with_context(|| format!("HARBOR_CA_FILE {path}: a certificate is unusable"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = if offer_h2 {
        vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
    } else {
        vec![ALPN_HTTP11.to_vec()]
    };
    Ok(Arc::new(config))
}

/// The system's trusted certificates (unreadable ones skipped, and logged at debug).
pub fn system_certificates() -> Vec<CertificateDer<'static>> {
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "skipping an unreadable system certificate");
    }
    native.certs
}

/// The certificates of the PEM file `path`, named by the variable `var` that set it: at least one,
/// or an error saying what is wrong (never the file's content).
pub fn ca_certificates(path: &str, var: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{var} {path}: cannot read"))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{var} {path}: not a PEM certificate file"))?;
    if certs.is_empty() {
        bail!("{var} {path}: holds no certificate");
    }
    Ok(certs)
}
