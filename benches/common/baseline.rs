//! The baseline: the generated service answering a fixed response, cloned
//! per request, behind the same mTLS acceptor (and the broker's own
//! `TlsStore`) and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;

use tokenbroker::listener::ConnectionLimits;
use tokenbroker::proto::token_broker_server::{TokenBroker, TokenBrokerServer};
use tokenbroker::proto::{
    GetIdpTokenRequest, GetIdpTokenResponse, InvalidateUserRequest, InvalidateUserResponse,
    ListIdpTokensRequest, ListIdpTokensResponse,
};
use tokenbroker::tls::{self, TlsStore};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use super::STOP_BOUND;

/// Answers every `GetIdpToken` with a clone of one response.
struct FixedAnswer(GetIdpTokenResponse);

#[tonic::async_trait]
impl TokenBroker for FixedAnswer {
    async fn get_idp_token(
        &self,
        _request: Request<GetIdpTokenRequest>,
    ) -> Result<Response<GetIdpTokenResponse>, Status> {
        Ok(Response::new(self.0.clone()))
    }

    async fn list_idp_tokens(
        &self,
        _request: Request<ListIdpTokensRequest>,
    ) -> Result<Response<ListIdpTokensResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }

    async fn invalidate_user(
        &self,
        _request: Request<InvalidateUserRequest>,
    ) -> Result<Response<InvalidateUserResponse>, Status> {
        Err(Status::unimplemented("baseline"))
    }
}

/// The baseline server on loopback port 0.
pub struct Baseline {
    /// Where it accepts mTLS connections.
    pub addr: SocketAddr,
    /// Ends its serve loop.
    stop: oneshot::Sender<()>,
    /// The serve loop.
    task: JoinHandle<()>,
}

impl Baseline {
    /// Serves `answer` over mTLS with `tls` (the broker's certificates).
    pub async fn start(tls: Arc<TlsStore>, answer: GetIdpTokenResponse) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = tls::incoming(listener, tls, ConnectionLimits::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = Server::builder()
                .add_service(TokenBrokerServer::new(FixedAnswer(answer)))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                eprintln!("baseline stopped with an error: {error}");
            }
        });
        Self { addr, stop, task }
    }

    /// Stops the server, aborting it if it takes longer than [`STOP_BOUND`].
    pub async fn stop(mut self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(STOP_BOUND, &mut self.task).await;
        self.task.abort();
    }
}
