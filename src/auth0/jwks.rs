//! The tenant's published signing keys (`/.well-known/jwks.json`), read on
//! the same send path as every Auth0 endpoint (size cap, metrics, error
//! mapping). The JWKS is public and outside the Management API quota, so it
//! skips the outbound limits and retries: `id_token` bounds its fetches
//! itself (a fetch limit, and a failed fetch remembered for a while).

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use super::send::{common_error, send_json};
use super::{Auth0Client, Auth0Error, ErrorBody};

/// Where Auth0 publishes a tenant's signing keys, below the issuer base URL;
/// also the request's `endpoint` label in `tokenbroker_auth0_requests_total`.
const JWKS_ENDPOINT: &str = "/.well-known/jwks.json";

/// Fetches one tenant's JWKS. Cheap to clone: clones share the client's connections.
#[derive(Clone)]
pub struct JwksSource {
    http: reqwest::Client,
    url: String,
    /// Bounds one request, shorter than a Management API call may take: a
    /// verification waits on it.
    timeout: Duration,
}

impl Auth0Client {
    /// The JWKS of the tenant at `issuer_base_url` (trailing slash ignored),
    /// read over this client's connections, each request cut after `timeout`.
    pub fn jwks_source(&self, issuer_base_url: &str, timeout: Duration) -> JwksSource {
        JwksSource {
            http: self.http.clone(),
            url: format!("{}{JWKS_ENDPOINT}", issuer_base_url.trim_end_matches('/')),
            timeout,
        }
    }
}

impl JwksSource {
    /// One request for the key set, not retried: a status other than 2xx maps
    /// as on any endpoint (429 [`Auth0Error::RateLimited`], 5xx
    /// [`Auth0Error::ServerError`], else [`Auth0Error::Unexpected`]); a body
    /// that is no JWK set is [`Auth0Error::InvalidBody`].
    pub async fn fetch(&self) -> Result<JwkSet, Auth0Error> {
        let request = self.http.get(&self.url).timeout(self.timeout);
        send_json(request, JWKS_ENDPOINT, jwks_endpoint_error).await
    }
}

/// The JWKS has no statuses of its own: any failure is the tenant's.
fn jwks_endpoint_error(status: StatusCode, headers: &HeaderMap, bytes: &[u8]) -> Auth0Error {
    common_error(status, headers, ErrorBody::parse(bytes))
}
