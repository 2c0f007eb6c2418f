//! A throwaway PKI on disk: the one `crate::pki` makes for `tokenbroker dev`,
//! but in a temporary directory and with as many client certificates as a
//! test asks for.

use std::path::PathBuf;

use tempfile::TempDir;

use crate::pki::{write_file, CertificateAuthority, IssuedCertificate, LeafSpec, PkiError};
use crate::tls::{TlsError, TlsFiles, TlsStore};

/// A CA, a loopback server certificate it issued, and the files a broker
/// reads them from (`server.pem`, `server.key`, `ca.pem`), in a temporary
/// directory removed when this is dropped.
pub struct TestPki {
    /// Issues client certificates, and is the trust anchor of both sides.
    pub ca: CertificateAuthority,
    /// The server's certificate and key, to check neither reaches a log.
    pub server: IssuedCertificate,
    /// Where the server's certificate, key and client CA are written.
    pub files: TlsFiles,
    /// Holds the files (and whatever else a test writes beside them) for as
    /// long as the PKI lives.
    pub dir: TempDir,
}

impl TestPki {
    /// A new CA named `ca_name` and a server certificate for loopback, written
    /// to a fresh temporary directory.
    pub fn generate(ca_name: &str) -> Result<Self, PkiError> {
        let dir = tempfile::tempdir().map_err(|source| PkiError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let ca = CertificateAuthority::generate(ca_name)?;
        let server = ca.issue(&LeafSpec::loopback_server())?;
        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.pem"),
        };
        write_file(&files.cert, &server.cert_pem, false)?;
        write_file(&files.key, &server.key_pem, true)?;
        write_file(&files.client_ca, &ca.cert_pem, false)?;
        Ok(Self {
            ca,
            server,
            files,
            dir,
        })
    }

    /// A client certificate from this CA whose caller id is `spiffe_id`.
    pub fn issue_client(&self, spiffe_id: &str) -> Result<IssuedCertificate, PkiError> {
        self.ca.issue(&LeafSpec::spiffe_client(spiffe_id))
    }

    /// The broker's TLS material, read from [`Self::files`].
    pub fn tls_store(&self) -> Result<TlsStore, TlsError> {
        TlsStore::open(self.files.clone())
    }

    /// `name` in the PKI's directory, for the other files a test writes.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
