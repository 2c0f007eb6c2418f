//! Certificates for `tokenbroker dev` and the tests (rcgen): a CA, a server
//! certificate for loopback, and client certificates whose identity is a
//! SPIFFE id, a DNS name or a subject CN.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Why certificates could not be made, loaded or written; names the file.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A CA that can issue server and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the CA certificate: the trust anchor clients and the server load.
    pub cert_pem: String,
}

/// What a leaf certificate is for and whom it names.
#[derive(Debug, Clone, Default)]
pub struct LeafSpec {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    /// URI SANs, e.g. SPIFFE ids.
    pub uris: Vec<String>,
    /// Server (serverAuth) or client (clientAuth) certificate.
    pub server: bool,
    /// Extensions added as given, DER and all: how tests make the broken or
    /// repeated SAN extensions that hostile clients send.
    pub raw_extensions: Vec<RawExtension>,
}

/// An X.509 extension by OID and DER content, written verbatim.
#[derive(Debug, Clone)]
pub struct RawExtension {
    pub oid: Vec<u64>,
    pub content: Vec<u8>,
}

impl LeafSpec {
    /// A server certificate for loopback (`localhost`, 127.0.0.1, ::1).
    pub fn loopback_server() -> Self {
        Self {
            common_name: "tokenbroker".to_owned(),
            dns_names: vec!["localhost".to_owned()],
            ip_addresses: vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
            ],
            server: true,
            ..Self::default()
        }
    }

    /// A client certificate identified by a SPIFFE id (URI SAN).
    pub fn spiffe_client(spiffe_id: &str) -> Self {
        Self {
            common_name: "tokenbroker client".to_owned(),
            uris: vec![spiffe_id.to_owned()],
            ..Self::default()
        }
    }

    /// A client certificate identified by a DNS SAN.
    pub fn dns_client(dns_name: &str) -> Self {
        Self {
            common_name: "tokenbroker client".to_owned(),
            dns_names: vec![dns_name.to_owned()],
            ..Self::default()
        }
    }

    /// A client certificate identified only by its subject CN.
    pub fn cn_client(common_name: &str) -> Self {
        Self {
            common_name: common_name.to_owned(),
            ..Self::default()
        }
    }
}

/// A certificate and its private key, PEM-encoded.
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    /// A new self-signed CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let certificate = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: certificate.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA loaded back from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// PEM of the CA's private key.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf certificate as `spec` describes.
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCertificate, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        for dns in &spec.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into()?));
        }
        for ip in &spec.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        for uri in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        for raw in &spec.raw_extensions {
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(
                    &raw.oid,
                    raw.content.clone(),
                ));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if spec.server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let certificate = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The dev PKI on disk: CA, server and one client certificate.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// The identity of `tokenbroker dev`'s client certificate.
pub const DEV_CLIENT_ID: &str = "spiffe://tokenbroker.dev/ns/dev/sa/grpcurl";

impl DevPki {
    /// Reuses the files in `dir` if they are all there, else generates them.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let pki = Self {
            dir: dir.to_owned(),
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        let all_there = [
            &pki.ca_cert,
            &pki.server_cert,
            &pki.server_key,
            &pki.client_cert,
            &pki.client_key,
        ]
        .iter()
        .all(|path| path.is_file());
        if !all_there {
            pki.generate()?;
        }
        Ok(pki)
    }

    fn generate(&self) -> Result<(), PkiError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| PkiError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let ca = CertificateAuthority::generate("tokenbroker dev CA")?;
        let server = ca.issue(&LeafSpec::loopback_server())?;
        let client = ca.issue(&LeafSpec::spiffe_client(DEV_CLIENT_ID))?;
        write_file(&self.ca_cert, &ca.cert_pem, false)?;
        write_file(&self.server_cert, &server.cert_pem, false)?;
        write_file(&self.server_key, &server.key_pem, true)?;
        write_file(&self.client_cert, &client.cert_pem, false)?;
        write_file(&self.client_key, &client.key_pem, true)?;
        Ok(())
    }
}

/// Writes `contents`; private keys are readable by the owner only.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let io_error = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(io_error)?;
    file.write_all(contents.as_bytes()).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn dev_pki_is_reused_on_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let first = DevPki::load_or_create(dir.path()).unwrap();
        let ca_before = std::fs::read_to_string(&first.ca_cert).unwrap();
        let second = DevPki::load_or_create(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&second.ca_cert).unwrap(), ca_before);
    }

    #[test]
    fn a_saved_ca_can_issue_again() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let reloaded = CertificateAuthority::from_pem(&ca.cert_pem, &ca.key_pem()).unwrap();
        assert!(reloaded.issue(&LeafSpec::cn_client("x")).is_ok());
    }
}
