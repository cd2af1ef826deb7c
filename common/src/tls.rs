//! Mutual TLS: loading PEM files with errors that name the fix, and the
//! rustls configurations of both ends (TLS 1.3 only, ring provider).
//!
//! The receiver requires a client certificate signed by its `--ca` and may
//! further restrict it by CN or DNS name (`--allow-client`); the sender
//! verifies the receiver's certificate against its `--ca` and the name it
//! connects to (`--server-name`).

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {reason} (create certificates with `make certs` or scripts/make-certs.sh; see README)")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} file {path} holds no PEM {expected}")]
    Empty {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("TLS set-up: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |reason: String| TlsError::Read {
        what,
        path: path.display().to_string(),
        reason,
    };
    // Read first so that a missing file says "No such file or directory".
    let pem = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.display().to_string(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| TlsError::Read {
        what: "key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Empty {
        what: "key",
        path: path.display().to_string(),
        expected: "private key (PKCS#8, PKCS#1 or SEC1)",
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs("CA certificate", ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Config(format!("CA certificate {}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

/// The three files every zfsync end needs.
#[derive(Clone, Debug)]
pub struct TlsFiles<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

fn mismatch(files: &TlsFiles<'_>, e: rustls::Error) -> TlsError {
    TlsError::Config(format!(
        "certificate {} and key {} do not fit together: {e}",
        files.cert.display(),
        files.key.display()
    ))
}

pub fn server_config(files: &TlsFiles<'_>) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(files.ca)?, p.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let certs = load_certs("certificate", files.cert)?;
    let key = load_key(files.key)?;
    let cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| mismatch(files, e))?;
    Ok(Arc::new(cfg))
}

pub fn client_config(files: &TlsFiles<'_>) -> Result<Arc<ClientConfig>, TlsError> {
    let p = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(files.ca)?, p.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let certs = load_certs("certificate", files.cert)?;
    let key = load_key(files.key)?;
    let cfg = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(certs, key)
        .map_err(|e| mismatch(files, e))?;
    Ok(Arc::new(cfg))
}

/// The names a peer certificate carries: its subject CN and DNS SANs.
pub fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = x
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = gn {
                names.push(d.to_string());
            }
        }
    }
    names
}

/// Explains a TLS failure seen by the sender in terms of what to fix.
pub fn explain_client_error(msg: &str, server_name: &str) -> String {
    let hint = if msg.contains("NotValidForName") || msg.contains("not valid for name") {
        format!(
            "the receiver's certificate is not valid for the name {server_name:?}; connect by a name its certificate carries, or pass --server-name NAME"
        )
    } else if msg.contains("UnknownIssuer") || msg.contains("BadSignature") {
        "the receiver's certificate is not signed by the CA given with --ca".to_string()
    } else if msg.contains("Expired") {
        "a certificate has expired; make new ones".to_string()
    } else if msg.contains("CertificateRequired")
        || msg.contains("certificate required")
        || msg.contains("BadCertificate")
        || msg.contains("bad certificate")
        || msg.contains("UnknownCA")
        || msg.contains("unknown ca")
        || msg.contains("AccessDenied")
        || msg.contains("DecryptError")
        || msg.contains("alert")
        || msg.contains("reset")
        || msg.contains("eof")
        || msg.contains("EOF")
    {
        "the receiver rejected this sender's certificate: sign it with the CA the receiver trusts (its --ca), and check the receiver's --allow-client".to_string()
    } else {
        "check that both ends use certificates from the same CA (see README: certificates)"
            .to_string()
    };
    format!("TLS handshake failed: {msg}: {hint}")
}
