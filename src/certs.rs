//! The client listener's certificate and key (`TLS_CERT_FILE`, `TLS_KEY_FILE`): PEM files read into
//! the key rustls serves, checked at start (a bad file is a start error naming its variable) and
//! read again when they change ([`crate::server::tls`]). A problem is described by the variable and
//! what is wrong, never by the files' content.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Which of the two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum File {
    /// `TLS_CERT_FILE`.
    Cert,
    /// `TLS_KEY_FILE`.
    Key,
}

/// What is wrong with the files: the one at fault, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: File,
    pub problem: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let var = match self.file {
            File::Cert => "TLS_CERT_FILE",
            File::Key => "TLS_KEY_FILE",
        };
        write!(f, "{var}: {}", self.problem)
    }
}

fn problem(file: File, problem: impl Into<String>) -> Problem {
    Problem {
        file,
        problem: problem.into(),
    }
}

/// The two files' bytes, as read (compared to notice a change).
pub fn read(cert: &str, key: &str) -> Result<(Vec<u8>, Vec<u8>), Problem> {
    let c =
        std::fs::read(cert).map_err(|e| problem(File::Cert, format!("cannot read {cert}: {e}")))?;
    let k =
        std::fs::read(key).map_err(|e| problem(File::Key, format!("cannot read {key}: {e}")))?;
    Ok((c, k))
}

/// The certificate chain (leaf first) and its private key, from PEM bytes.
pub fn parse(cert: &[u8], key: &[u8]) -> Result<Arc<CertifiedKey>, Problem> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|_| problem(File::Cert, "is not a PEM certificate file"))?;
    if chain.is_empty() {
        return Err(problem(File::Cert, "holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| {
        problem(
            File::Key,
            "holds no private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC)",
        )
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|_| problem(File::Key, "is a key of a type TLS cannot use here"))?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        // A key rustls cannot compare (no public key to check against) is taken as it is.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(_) => Err(problem(
            File::Key,
            "does not match the certificate in TLS_CERT_FILE",
        )),
    }
}

/// Reads and parses the two files.
pub fn load(cert: &str, key: &str) -> Result<Arc<CertifiedKey>, Problem> {
    let (c, k) = read(cert, key)?;
    parse(&c, &k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (c.cert.pem(), c.key_pair.serialize_pem())
    }

    #[test]
    fn a_certificate_and_its_key_load_and_every_problem_names_its_variable() {
        let (cert, key) = pair("router.test");
        assert!(parse(cert.as_bytes(), key.as_bytes()).is_ok());
        let (_, other_key) = pair("other.test");
        let e = parse(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert_eq!(e.file, File::Key);
        assert!(e.problem.contains("does not match"), "{e}");
        let e = parse(b"not pem", key.as_bytes()).unwrap_err();
        assert_eq!(e.file, File::Cert);
        let e = parse(key.as_bytes(), key.as_bytes()).unwrap_err();
        assert_eq!(
            (e.file, e.problem.as_str()),
            (File::Cert, "holds no certificate")
        );
        let e = parse(cert.as_bytes(), cert.as_bytes()).unwrap_err();
        assert_eq!(e.file, File::Key);
        assert!(
            !e.to_string().contains("BEGIN"),
            "never the files' content: {e}"
        );
        let e = load("/nonexistent/cert.pem", "/nonexistent/key.pem").unwrap_err();
        assert_eq!(e.file, File::Cert);
    }
}
