//! Who a caller is: the identity read from its verified client certificate,
//! and the same identity as a policy file spells it.
//!
//! A caller id has a kind, and the kind is part of the id, so that a name of
//! one kind can never pass for a name of another:
//!
//! | certificate names the caller by | caller id | policy `id` |
//! |---|---|---|
//! | a URI SAN (SPIFFE id) | the URI, e.g. `spiffe://example.org/ns/prod/sa/billing` | the URI |
//! | else its first DNS SAN | the name, e.g. `billing.prod.svc` | the name, or `dns:billing.prod.svc` |
//! | else its subject CN | `cn:` + the CN, e.g. `cn:legacy-billing` | `cn:legacy-billing` |
//!
//! A CN spelled like a SPIFFE id becomes `cn:spiffe://…` and matches no URI
//! entry; a DNS SAN cannot hold `:` or `/`, so it cannot look like a URI or a
//! `cn:` id either.
//!
//! A certificate whose SAN extension is present but cannot be read, appears
//! twice, or holds a URI or DNS name that is not valid has **no** caller id:
//! the broker never falls back to a weaker name when a stronger one is there
//! but unreadable (that fallback let a certificate with a broken URI SAN and
//! another workload's SPIFFE id in its CN act as that workload).

use std::sync::Arc;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Prefix of a caller id taken from the subject CN.
pub const CN_PREFIX: &str = "cn:";
/// Optional prefix of a DNS-SAN caller id in a policy file.
pub const DNS_PREFIX: &str = "dns:";

/// Longest URI SAN accepted as a caller id.
const MAX_URI_LEN: usize = 2048;
/// Longest DNS name (RFC 1035).
const MAX_DNS_LEN: usize = 253;
/// Longest subject CN (RFC 5280's upper bound for commonName).
const MAX_CN_LEN: usize = 64;

/// Why a verified certificate yields no caller id. The certificate chained to
/// the client CA, so this is a CA issuing odd certificates or an attacker
/// probing: the connection is refused every RPC, and the reason is logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnreadableCaller {
    #[error("no verified client certificate identifies the caller")]
    NoCertificate,
    #[error("the client certificate cannot be parsed")]
    Certificate,
    #[error("the client certificate's subjectAltName extension appears more than once")]
    DuplicateSan,
    #[error("the client certificate's subjectAltName extension cannot be read")]
    UnreadableSan,
    #[error("the client certificate's URI SAN is not a valid URI")]
    InvalidUri,
    #[error("the client certificate's DNS SAN is not a valid DNS name")]
    InvalidDnsName,
    #[error("the client certificate's subject CN is missing, not text, or has control characters")]
    InvalidCommonName,
}

/// The caller id of a verified leaf certificate (see the module docs for the
/// kinds and their precedence).
pub fn identify(leaf_der: &[u8]) -> Result<Arc<str>, UnreadableCaller> {
    let (_, certificate) =
        X509Certificate::from_der(leaf_der).map_err(|_| UnreadableCaller::Certificate)?;
    let names = subject_alt_names(&certificate)?;
    if let Some(uri) = first_uri(names)? {
        return Ok(Arc::from(uri));
    }
    if let Some(dns) = first_dns_name(names)? {
        return Ok(Arc::from(dns));
    }
    common_name(&certificate).map(|cn| Arc::from(format!("{CN_PREFIX}{cn}")))
}

/// Every SAN entry; an absent extension is an empty list, a broken or
/// repeated one is an error (never "no SANs").
fn subject_alt_names<'a>(
    certificate: &'a X509Certificate<'_>,
) -> Result<&'a [GeneralName<'a>], UnreadableCaller> {
    use x509_parser::error::X509Error;
    match certificate.subject_alternative_name() {
        // x509-parser keeps an entry it cannot decode (a URI or DNS name that
        // is not IA5 text) as `Invalid`: the extension is then unreadable.
        Ok(Some(san))
            if san
                .value
                .general_names
                .iter()
                .any(|name| matches!(name, GeneralName::Invalid(..))) =>
        {
            Err(UnreadableCaller::UnreadableSan)
        }
        Ok(Some(san)) => Ok(&san.value.general_names),
        Ok(None) => Ok(&[]),
        Err(X509Error::DuplicateExtensions) => Err(UnreadableCaller::DuplicateSan),
        Err(_) => Err(UnreadableCaller::UnreadableSan),
    }
}

/// The first URI SAN, once every URI SAN has been checked.
fn first_uri<'a>(names: &[GeneralName<'a>]) -> Result<Option<&'a str>, UnreadableCaller> {
    let mut first = None;
    for name in names {
        if let GeneralName::URI(uri) = name {
            if !is_valid_uri(uri) {
                return Err(UnreadableCaller::InvalidUri);
            }
            first = first.or(Some(*uri));
        }
    }
    Ok(first)
}

/// The first DNS SAN, once every DNS SAN has been checked.
fn first_dns_name<'a>(names: &[GeneralName<'a>]) -> Result<Option<&'a str>, UnreadableCaller> {
    let mut first = None;
    for name in names {
        if let GeneralName::DNSName(dns) = name {
            if !is_valid_dns_name(dns) {
                return Err(UnreadableCaller::InvalidDnsName);
            }
            first = first.or(Some(*dns));
        }
    }
    Ok(first)
}

fn common_name(certificate: &X509Certificate<'_>) -> Result<String, UnreadableCaller> {
    let mut names = certificate.subject().iter_common_name();
    let cn = names
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(UnreadableCaller::InvalidCommonName)?;
    if names.next().is_some()
        || cn.is_empty()
        || cn.len() > MAX_CN_LEN
        || cn.chars().any(char::is_control)
    {
        return Err(UnreadableCaller::InvalidCommonName);
    }
    Ok(cn.to_owned())
}

/// An absolute URI of printable ASCII with a scheme, as a SPIFFE id is.
fn is_valid_uri(uri: &str) -> bool {
    uri.len() <= MAX_URI_LEN
        && uri.bytes().all(|b| b.is_ascii_graphic())
        && uri.contains("://")
        && url::Url::parse(uri).is_ok()
}

/// Letters, digits and hyphens in dot-separated labels of 1 to 63 bytes;
/// no wildcard (a caller is one workload, not a pattern).
pub fn is_valid_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= MAX_DNS_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A policy file's `id` as the caller id it must equal, or why it can never
/// match a certificate. `dns:` is dropped (DNS ids are bare); a URI must be
/// valid; a `cn:` id keeps its prefix; a bare id must be a DNS name.
pub fn policy_id(id: &str) -> Result<String, String> {
    if let Some(cn) = id.strip_prefix(CN_PREFIX) {
        if cn.is_empty() || cn.len() > MAX_CN_LEN || cn.chars().any(char::is_control) {
            return Err(format!(
                "caller id {id:?}: a cn: id needs a subject CN of 1 to {MAX_CN_LEN} characters"
            ));
        }
        return Ok(id.to_owned());
    }
    if id.contains("://") {
        if !is_valid_uri(id) {
            return Err(format!("caller id {id:?} is not a valid URI"));
        }
        return Ok(id.to_owned());
    }
    let dns = id.strip_prefix(DNS_PREFIX).unwrap_or(id);
    if !is_valid_dns_name(dns) {
        return Err(format!(
            "caller id {id:?} is neither a URI (spiffe://…), a DNS name, nor a subject CN written as \"cn:{id}\""
        ));
    }
    Ok(dns.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, LeafSpec};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    fn der_of(spec: &LeafSpec) -> Vec<u8> {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca.issue(spec).unwrap();
        CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn uri_san_wins_then_dns_name_then_cn_with_its_prefix() {
        let spec = LeafSpec {
            common_name: "legacy".into(),
            dns_names: vec!["billing.svc".into()],
            uris: vec!["spiffe://example.org/sa/billing".into()],
            ..LeafSpec::default()
        };
        assert_eq!(
            &*identify(&der_of(&spec)).unwrap(),
            "spiffe://example.org/sa/billing"
        );
        let dns = LeafSpec::dns_client("billing.svc");
        assert_eq!(&*identify(&der_of(&dns)).unwrap(), "billing.svc");
        let cn = LeafSpec::cn_client("legacy");
        assert_eq!(&*identify(&der_of(&cn)).unwrap(), "cn:legacy");
    }

    #[test]
    fn a_cn_spelled_like_a_spiffe_id_stays_a_cn() {
        let cn = LeafSpec::cn_client("spiffe://example.org/sa/reports");
        assert_eq!(
            &*identify(&der_of(&cn)).unwrap(),
            "cn:spiffe://example.org/sa/reports"
        );
    }

    #[test]
    fn policy_ids_name_their_kind() {
        assert_eq!(
            policy_id("spiffe://example.org/sa/billing").unwrap(),
            "spiffe://example.org/sa/billing"
        );
        assert_eq!(policy_id("dns:billing.svc").unwrap(), "billing.svc");
        assert_eq!(policy_id("billing.svc").unwrap(), "billing.svc");
        assert_eq!(policy_id("cn:legacy billing").unwrap(), "cn:legacy billing");
        assert!(policy_id("legacy billing").unwrap_err().contains("cn:"));
        assert!(policy_id("spiffe://bad host/x y").is_err());
    }

    #[test]
    fn dns_names_are_checked_label_by_label() {
        assert!(is_valid_dns_name("a-b.example.org"));
        assert!(is_valid_dns_name("localhost."));
        assert!(!is_valid_dns_name("*.example.org"));
        assert!(!is_valid_dns_name("-a.example"));
        assert!(!is_valid_dns_name("a..b"));
        assert!(!is_valid_dns_name("spiffe://x"));
        assert!(!is_valid_dns_name(""));
    }
}
