//! Reading a response body with a size cap, for every answer the broker reads
//! from Auth0 (and any other IdP it will read from): a hostile or broken
//! server must not be able to make the broker buffer an unbounded body. One
//! 500 MB users body took the broker's RSS to 696 MB before this cap.

use reqwest::Response;

/// Largest body the broker reads from Auth0: users, `/oauth/token`, error
/// bodies and the JWKS. Real answers are a few KiB; a user with many linked
/// identities stays far below this.
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The body is (or announced to be) larger than the cap; the rest was not read.
    #[error("{endpoint} answered with a body larger than {limit} bytes")]
    TooLarge {
        endpoint: &'static str,
        limit: usize,
    },
    /// The connection failed while the body was being read.
    #[error("reading the body of {endpoint} failed")]
    Transport {
        endpoint: &'static str,
        #[source]
        source: reqwest::Error,
    },
}

/// Reads `response`'s body chunk by chunk and stops as soon as it passes
/// `limit` bytes (or at once when `Content-Length` already says it will), so
/// at most `limit` bytes plus one chunk are ever held. An oversized body is
/// logged as a warning; `endpoint` names the request in it.
pub(crate) async fn read_capped(
    mut response: Response,
    endpoint: &'static str,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    let announced = response.content_length();
    if announced.is_some_and(|length| length > limit as u64) {
        return Err(too_large(endpoint, limit, announced));
    }
    let expected = announced.map_or(0, |length| length as usize);
    let mut body = Vec::with_capacity(expected);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| BodyError::Transport { endpoint, source })?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large(endpoint, limit, announced));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error for a body over `limit`, logged once here.
fn too_large(endpoint: &'static str, limit: usize, announced: Option<u64>) -> BodyError {
    tracing::warn!(
        endpoint,
        limit,
        content_length = announced,
        "response body over the size cap; not read"
    );
    BodyError::TooLarge { endpoint, limit }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-shot HTTP/1.1 server on loopback answering `head` and then
    /// `body_len` bytes of `x` in 16 KiB writes; returns its URL and a task
    /// that yields how many body bytes it managed to write.
    async fn server(head: String, body_len: usize) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            if socket.write_all(head.as_bytes()).await.is_err() {
                return 0;
            }
            let chunk = vec![b'x'; 16 * 1024];
            let mut written = 0;
            while written < body_len {
                let n = chunk.len().min(body_len - written);
                let write = socket.write_all(&chunk[..n]);
                match tokio::time::timeout(Duration::from_secs(2), write).await {
                    Ok(Ok(())) => written += n,
                    _ => break,
                }
            }
            written
        });
        (url, task)
    }

    async fn get(url: &str) -> Response {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(url)
            .send()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\n";
        let (url, _task) = server(head.to_owned(), 100).await;
        let body = read_capped(get(&url).await, "/test", 100).await.unwrap();
        assert_eq!(body.len(), 100);
    }

    #[tokio::test]
    async fn an_announced_length_over_the_limit_is_refused_before_reading() {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 50000000\r\nconnection: close\r\n\r\n";
        let (url, task) = server(head.to_owned(), 50_000_000).await;
        let error = read_capped(get(&url).await, "/test", 1024)
            .await
            .unwrap_err();
        assert!(matches!(
            error,
            BodyError::TooLarge {
                endpoint: "/test",
                limit: 1024
            }
        ));
        let written = task.await.unwrap();
        assert!(written < 25_000_000, "the server wrote {written} bytes");
    }

    #[tokio::test]
    async fn a_body_of_unannounced_length_stops_being_read_past_the_limit() {
        let head = "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n";
        let (url, task) = server(head.to_owned(), 50_000_000).await;
        let error = read_capped(get(&url).await, "/test", 64 * 1024)
            .await
            .unwrap_err();
        assert!(matches!(error, BodyError::TooLarge { .. }), "{error}");
        let written = task.await.unwrap();
        assert!(written < 25_000_000, "the server wrote {written} bytes");
    }
}
