//! `[upstream]`: how sluice connects to its endpoints beyond the timeouts, today the extra CA
//! it trusts for `https://` endpoints behind a private CA. Reading that file lives here too,
//! so `sluice check` and the connector accept exactly the same files.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use serde::{Deserialize, Serialize};

use super::validate::Problems;

/// `[upstream]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// A PEM file of CA certificates trusted for `https://` endpoints, on top of the system's
    /// roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Why a CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// The file could not be read.
    #[error("cannot read {path:?}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not PEM, or a certificate in it is malformed.
    #[error("{path:?} is not a PEM file of CA certificates: {why}")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// The certificates of the PEM file at `path`, each one checked to be usable as a trust
/// anchor; a file holding none is an error (a key or an empty file is a mistake, not "no
/// extra CA").
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let bytes = std::fs::read(path).map_err(|source| CaFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let not_pem = |why: String| CaFileError::NotPem {
        path: path.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(not_pem("no \"BEGIN CERTIFICATE\" block in it".into()));
    }
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots
            .add(cert.clone())
            .map_err(|e| not_pem(format!("certificate {} cannot be parsed: {e}", i + 1)))?;
    }
    Ok(certs)
}

pub(super) fn validate(p: &mut Problems, upstream: &UpstreamConfig) {
    if let Some(path) = &upstream.ca_file {
        if let Err(e) = load_ca_file(path) {
            p.add("upstream.ca_file", e.to_string());
        }
    }
}
