//! The one way a request reaches the tenant and its answer comes back: the
//! request is sent and counted, every body is read under the size cap, a 2xx
//! body is parsed as JSON and any other status goes through the endpoint's
//! error mapping, which falls back on [`common_error`]. Every endpoint
//! (`/oauth/token`, `/api/v2/users`, the JWKS) goes through [`send_json`], so
//! none can forget the cap or the metrics.

use std::time::Instant;

use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use tokio::time::Instant as Deadline;

use super::body;
use super::{retry_delay, Auth0Client, Auth0Error, ErrorBody};
use crate::stats;

/// How an endpoint names a non-2xx answer: its status, headers and (capped) body.
pub(super) type ErrorMapping = fn(StatusCode, &HeaderMap, &[u8]) -> Auth0Error;

impl Auth0Client {
    /// A call to a rate-limited Auth0 endpoint: each attempt built by
    /// `request` and sent by [`send_json`], all of them within the outbound
    /// limits, retries and time budget (`outbound.rs`), retried within `deadline`.
    pub(super) async fn call_json<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        deadline: Option<Deadline>,
        mut request: impl FnMut() -> RequestBuilder,
        map_error: ErrorMapping,
    ) -> Result<T, Auth0Error> {
        self.try_call_json(endpoint, deadline, || Ok(request()), map_error)
            .await
    }

    /// [`Self::call_json`] for requests whose building can fail (a JWT to
    /// sign per attempt): such an attempt fails without being sent.
    pub(super) async fn try_call_json<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        deadline: Option<Deadline>,
        mut request: impl FnMut() -> Result<RequestBuilder, Auth0Error>,
        map_error: ErrorMapping,
    ) -> Result<T, Auth0Error> {
        self.outbound
            .call(endpoint, deadline, || {
                let request = request();
                async move { send_json(request?, endpoint, map_error).await }
            })
            .await
    }
}

/// Sends `request` and parses a 2xx JSON body; other statuses go through the
/// endpoint's own error mapping. Every body, error bodies included, is read
/// with the [`body::MAX_BODY_BYTES`] cap: a larger one is
/// [`Auth0Error::BodyTooLarge`] whatever the status.
pub(super) async fn send_json<T: DeserializeOwned>(
    request: RequestBuilder,
    endpoint: &'static str,
    map_error: ErrorMapping,
) -> Result<T, Auth0Error> {
    let started = Instant::now();
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => {
            stats::auth0_request(endpoint, 0, started.elapsed());
            return Err(Auth0Error::from_transport(error));
        }
    };
    let status = response.status();
    stats::auth0_request(endpoint, status.as_u16(), started.elapsed());
    let headers = response.headers().clone();
    if !status.is_success() {
        // The status decides an error; its body only adds Auth0's words, so
        // an oversized one is dropped rather than hiding a 429 or 503.
        let bytes = body::read_capped(response, endpoint, body::MAX_BODY_BYTES)
            .await
            .unwrap_or_default();
        return Err(map_error(status, &headers, &bytes));
    }
    let bytes = body::read_capped(response, endpoint, body::MAX_BODY_BYTES).await?;
    serde_json::from_slice(&bytes).map_err(|e| Auth0Error::InvalidBody(format!("{endpoint}: {e}")))
}

/// What a status means on any endpoint once the endpoint's own cases are
/// handled: 429 and 5xx are transient (with Auth0's retry delay), anything
/// else is unexpected and keeps Auth0's code and words.
pub(super) fn common_error(status: StatusCode, headers: &HeaderMap, body: ErrorBody) -> Auth0Error {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Auth0Error::RateLimited {
            retry_after: retry_delay(headers),
        };
    }
    if status.is_server_error() {
        return Auth0Error::ServerError {
            status: status.as_u16(),
            retry_after: retry_delay(headers),
        };
    }
    Auth0Error::Unexpected {
        status: status.as_u16(),
        code: body.code(),
        message: body.description(),
    }
}
