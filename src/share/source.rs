//! Where the link finds the Redis master: through the Sentinels of `REDIS_SENTINELS`, or at the one
//! endpoint of `REDIS_URL`, in plain TCP or TLS. Built once at start, so a bad setting (a CA file
//! that holds no certificate, a trust store with nothing in it) stops the router with the variable's
//! name instead of leaving it to run without sharing.
//!
//! With TLS, Redis's certificate is checked against the host connected to: the REDIS_URL host, each
//! Sentinel's host, and the master as the Sentinels name it (an IP address unless they announce
//! hostnames, so its certificate needs that IP as a subject alternative name). The roots are the
//! system's trust store plus `REDIS_CA_FILE`, as for Harbor with `HARBOR_CA_FILE`, but for one
//! thing: with an empty system store and no CA file the router does not start (Harbor's client
//! falls back to the bundled webpki roots, which the `redis` crate cannot be handed).

use anyhow::bail;
use base64::Engine;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, RedisError, TlsCertificates, TlsMode};
use rustls::pki_types::CertificateDer;

use crate::config::Config;
use crate::upstream::tls::{ca_certificates, system_certificates};

/// Where the master is found.
pub(super) enum Source {
    /// Asked of the Sentinels (`REDIS_SENTINELS`), again on every connection.
    Sentinel(SentinelClient),
    /// One endpoint (`REDIS_URL`): a managed Redis fails over behind it.
    Direct(redis::Client),
}

impl Source {
    /// The source `config` names; `None` without Redis.
    pub fn from_config(c: &Config) -> anyhow::Result<Option<Source>> {
        if c.redis_url.is_none() && c.redis_sentinels.is_empty() {
            return Ok(None);
        }
        let certs = if c.redis_tls {
            Some(certificates(c.redis_ca_file.as_deref())?)
        } else {
            None
        };
        let source = match &c.redis_url {
            Some(url) => direct(c, url.expose(), certs),
            None => sentinel(c, certs).map(Source::Sentinel),
        };
        // The crate's message names no secret (the URL was checked at start, so this is rare).
        source
            .map(Some)
            .map_err(|e| anyhow::anyhow!("invalid Redis settings: {e}"))
    }

    /// A client of the master as it is now.
    pub async fn client(&mut self) -> Result<redis::Client, RedisError> {
        match self {
            Source::Sentinel(s) => s.async_get_client().await,
            Source::Direct(c) => Ok(c.clone()),
        }
    }

    /// Where a connection problem happened, for the log, when the address is not known yet.
    pub fn unnamed_address(&self) -> &'static str {
        match self {
            Source::Sentinel(_) => "a Sentinel or the master it names",
            Source::Direct(_) => "REDIS_URL",
        }
    }

    pub fn via(&self) -> &'static str {
        match self {
            Source::Sentinel(_) => "Sentinel",
            Source::Direct(_) => "REDIS_URL",
        }
    }
}

fn direct(c: &Config, url: &str, certs: Option<TlsCertificates>) -> Result<Source, RedisError> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    let mut redis = info.redis_settings().clone().set_db(i64::from(c.redis_db));
    if let Some(pw) = &c.redis_password {
        redis = redis.set_password(pw.expose());
    }
    let info = info.set_redis_settings(redis);
    match certs {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
    .map(Source::Direct)
}

fn sentinel(c: &Config, certs: Option<TlsCertificates>) -> Result<SentinelClient, RedisError> {
    let addrs = c.redis_sentinels.iter().map(|s| match certs {
        Some(_) => ConnectionAddr::TcpTls {
            host: s.host.clone(),
            port: s.port,
            insecure: false,
            tls_params: None,
        },
        None => ConnectionAddr::Tcp(s.host.clone(), s.port),
    });
    let mut b =
        SentinelClientBuilder::new(addrs, &c.redis_master_name, SentinelServerType::Master)?
            .set_client_to_redis_db(i64::from(c.redis_db));
    if let Some(pw) = &c.redis_password {
        b = b.set_client_to_redis_password(pw.expose());
    }
    if let Some(certs) = certs {
        b = b
            .set_client_to_sentinel_certificates(certs.clone())
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_redis_certificates(certs);
    }
    b.build()
}

/// The roots Redis's certificate is checked against, as the `redis` crate takes them (PEM): the
/// system's store and the certificates of `ca_file`. The crate trusts only what it is given here,
/// so both are given; with neither, no certificate could be checked, and the router does not start.
fn certificates(ca_file: Option<&str>) -> anyhow::Result<TlsCertificates> {
    let mut roots: Vec<CertificateDer<'static>> = usable(system_certificates());
    if let Some(path) = ca_file {
        let extra = ca_certificates(path, "REDIS_CA_FILE")?;
        let n = extra.len();
        let extra = usable(extra);
        if extra.len() < n {
            bail!("REDIS_CA_FILE {path}: a certificate is unusable as a trust anchor");
        }
        roots.extend(extra);
    }
    if roots.is_empty() {
        bail!(
            "REDIS_TLS: the system has no trusted certificates to check Redis's with; set REDIS_CA_FILE to the CA that signed it"
        );
    }
    let mut pem = String::new();
    for cert in &roots {
        push_pem(&mut pem, cert);
    }
    Ok(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.into_bytes()),
    })
}

/// The certificates rustls accepts as trust anchors (the crate refuses the whole set for one that
/// is not).
fn usable(certs: Vec<CertificateDer<'static>>) -> Vec<CertificateDer<'static>> {
    certs
        .into_iter()
        .filter(|c| rustls::RootCertStore::empty().add(c.clone()).is_ok())
        .collect()
}

/// Appends `cert` to `pem` as one `CERTIFICATE` block.
fn push_pem(pem: &mut String, cert: &CertificateDer<'_>) {
    let body = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn roots_round_trip_through_pem() {
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        let mut pem = String::new();
        push_pem(&mut pem, a.cert.der());
        push_pem(&mut pem, b.cert.der());
        let back: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, vec![a.cert.der().clone(), b.cert.der().clone()]);
        assert!(pem.lines().all(|l| l.len() <= 64));
    }

    #[test]
    fn a_ca_file_adds_to_the_system_roots_and_a_bad_one_is_named() {
        let dir = std::env::temp_dir().join(format!("hr-redis-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["redis.test".into()]).unwrap();
        let file = dir.join("ca.pem");
        std::fs::write(&file, ca.cert.pem()).unwrap();
        let file = file.display().to_string();
        let system = usable(system_certificates()).len();
        let certs = certificates(Some(&file)).unwrap();
        let pem = certs.root_cert.unwrap();
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(roots.len(), system + 1);
        assert!(roots.contains(ca.cert.der()));

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let e = certificates(Some(&empty.display().to_string())).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.starts_with("REDIS_CA_FILE"), "{e}");
        assert!(!e.contains("no certificate here"), "never the content: {e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
