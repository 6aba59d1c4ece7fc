//! The rustls client configuration for `https://` HARBOR_URLs: the system's trust store (falling back
//! to the bundled webpki roots when the system has none, as in a scratch image) plus the CA file named
//! by `HARBOR_CA_FILE`, for a Harbor whose certificate comes from a private CA. Built once at start;
//! every core shares it read-only.

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
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "skipping an unreadable system certificate");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::info!("no system trust store found; using the bundled webpki roots");
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("HARBOR_CA_FILE {path}: cannot read"))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("HARBOR_CA_FILE {path}: not a PEM certificate file"))?;
        if certs.is_empty() {
            bail!("HARBOR_CA_FILE {path}: holds no certificate");
        }
        for cert in certs {
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
