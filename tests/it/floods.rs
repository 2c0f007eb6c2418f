//! HTTP/2 and connection floods: streams never finished, connections that
//! never speak, handshakes that never complete. Each test sets small limits
//! and drives the real listeners with raw clients (hand-written HTTP/2
//! frames, or the `h2` crate) over real mTLS or plaintext on loopback.

use std::sync::Arc;
use std::time::Duration;

use prost::bytes::Bytes;
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokenbroker::emulator::seed;
use tokenbroker::listener::ConnectionLimits;
use tokenbroker::proto::{GetIdpTokenRequest, GetIdpTokenResponse};
use tokenbroker::server::RunSettings;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{bounded, get_on, get_request, health_status, Options, TestBroker};

const GET_IDP_TOKEN: &str = "/tokenbroker.v1.TokenBroker/GetIdpToken";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// How long a test waits to be sure something that must not happen (a
/// handshake while the broker may not accept) has not happened.
const NOT_WITHIN: Duration = Duration::from_secs(1);

/// Bound for "closed after a timeout of a few hundred milliseconds": far
/// above the timeout, far below the broker's old behaviour (10 s or never).
const CLOSED_WITHIN: Duration = Duration::from_secs(5);

/// A broker (with the plaintext health port) whose connection limits are the
/// defaults changed by `limits`.
async fn broker_with(limits: impl FnOnce(&mut ConnectionLimits)) -> TestBroker {
    let mut connections = ConnectionLimits::default();
    limits(&mut connections);
    let defaults = Options::default();
    TestBroker::start_with(Options {
        health_listener: true,
        run: RunSettings {
            connections,
            ..defaults.run
        },
        ..defaults
    })
    .await
}

// ---- clients -------------------------------------------------------------

/// rustls client settings presenting the harness's client certificate and
/// offering only h2, as gRPC clients do.
fn client_tls(broker: &TestBroker) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(broker.ca.cert_pem.as_bytes()).expect("CA PEM");
    roots.add(ca).expect("CA certificate");
    let chain = CertificateDer::pem_slice_iter(broker.client_cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("client chain PEM");
    let key =
        PrivateKeyDer::from_pem_slice(broker.client_cert.key_pem.as_bytes()).expect("key PEM");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// An mTLS connection to the broker that completed the handshake and has
/// sent nothing else.
async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(config).connect(name, tcp).await
}

/// A plaintext channel to the health port.
async fn health_client(broker: &TestBroker) -> HealthClient<Channel> {
    let addr = broker.health_addr.expect("health listener requested");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("plaintext health connects");
    HealthClient::new(channel)
}

/// Reads and discards until the server closes the connection (EOF or an
/// error); `false` if it is still open after `within`.
async fn closed_within(io: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let drain = async {
        // Each read either returns data (the server's SETTINGS, say) or ends
        // the loop; the outer timeout bounds how many there can be.
        while let Ok(read) = io.read(&mut buf).await {
            if read == 0 {
                return;
            }
        }
    };
    tokio::time::timeout(within, drain).await.is_ok()
}

// ---- raw HTTP/2 ----------------------------------------------------------
//
// Hand-written frames, because a conforming client (the `h2` crate, tonic)
// never sends more streams than the server allows: only a raw client can
// show that the server enforces the limit rather than merely advertising it.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

/// One HTTP/2 frame as read off the wire.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn encode_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).expect("small frame");
    let mut frame = length.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// An HPACK "literal header field without indexing, new name", no Huffman:
/// the simplest encoding every decoder accepts.
fn hpack_literal(block: &mut Vec<u8>, name: &str, value: &str) {
    for part in [name, value] {
        let length = u8::try_from(part.len()).expect("short header");
        assert!(length < 0x7f, "fits the 7-bit length prefix");
        block.push(length);
        block.extend(part.as_bytes());
    }
}

/// HEADERS opening a gRPC call to `path` on `stream`, without END_STREAM:
/// the request body never comes.
fn unfinished_request(stream: u32, scheme: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", scheme),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00);
        hpack_literal(&mut block, name, value);
    }
    encode_frame(HEADERS, END_HEADERS, stream, &block)
}

async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let mut header = [0u8; 9];
    io.read_exact(&mut header).await?;
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; length];
    io.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: header[3],
        flags: header[4],
        stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// Sends the preface and empty SETTINGS, reads the server's SETTINGS and
/// acknowledges them; returns the SETTINGS_MAX_CONCURRENT_STREAMS advertised.
async fn raw_h2_start(io: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> Option<u32> {
    io.write_all(PREFACE).await.expect("preface");
    io.write_all(&encode_frame(SETTINGS, 0, 0, &[]))
        .await
        .expect("settings");
    let settings = bounded("the server's SETTINGS", read_frame(io))
        .await
        .expect("a frame");
    assert_eq!(
        settings.kind, SETTINGS,
        "the server speaks first with SETTINGS"
    );
    io.write_all(&encode_frame(SETTINGS, ACK, 0, &[]))
        .await
        .expect("settings ack");
    settings.payload.chunks_exact(6).find_map(|entry| {
        let id = u16::from_be_bytes([entry[0], entry[1]]);
        (id == SETTINGS_MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
    })
}

/// Opens `count` streams (ids 1, 3, 5, …) whose requests never finish.
async fn open_unfinished_streams(
    io: &mut (impl AsyncWrite + Unpin),
    count: u32,
    scheme: &str,
    path: &str,
) {
    let mut frames = Vec::new();
    for index in 0..count {
        frames.extend(unfinished_request(2 * index + 1, scheme, path));
    }
    io.write_all(&frames).await.expect("HEADERS frames");
    io.flush().await.expect("flush");
}

/// Reads frames until `refused` streams have been reset with REFUSED_STREAM
/// (bounded by `RPC_BOUND`); returns the ids of the refused streams.
async fn refused_streams(io: &mut (impl AsyncRead + Unpin), refused: usize) -> Vec<u32> {
    let mut ids = Vec::new();
    bounded("REFUSED_STREAM resets", async {
        while ids.len() < refused {
            let frame = read_frame(io).await.expect("the connection stays open");
            if frame.kind == RST_STREAM && frame.payload == REFUSED_STREAM.to_be_bytes() {
                ids.push(frame.stream);
            }
        }
    })
    .await;
    ids
}

// ---- streams -------------------------------------------------------------

#[tokio::test]
async fn streams_beyond_the_per_connection_limit_are_refused() {
    let broker = broker_with(|limits| limits.max_concurrent_streams = 8).await;
    let mut flood = tls_connect(broker.addr, client_tls(&broker))
        .await
        .expect("mTLS");
    let advertised = raw_h2_start(&mut flood).await;
    assert_eq!(advertised, Some(8), "SETTINGS_MAX_CONCURRENT_STREAMS");

    open_unfinished_streams(&mut flood, 50, "https", GET_IDP_TOKEN).await;
    let refused = refused_streams(&mut flood, 42).await;
    let open: Vec<u32> = (0..50)
        .map(|index| 2 * index + 1)
        .filter(|id| !refused.contains(id))
        .collect();
    assert_eq!(
        open,
        vec![1, 3, 5, 7, 9, 11, 13, 15],
        "the first 8 stay open"
    );

    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("another connection is served while the flood holds its streams");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    drop(flood);
    broker.stop().await;
}

#[tokio::test]
async fn health_port_refuses_streams_beyond_its_lower_limit() {
    let broker = broker_with(|limits| limits.health_max_concurrent_streams = 4).await;
    let addr = broker.health_addr.expect("health port");
    let mut flood = TcpStream::connect(addr).await.expect("connect");
    let advertised = raw_h2_start(&mut flood).await;
    assert_eq!(advertised, Some(4), "SETTINGS_MAX_CONCURRENT_STREAMS");

    open_unfinished_streams(&mut flood, 20, "http", HEALTH_CHECK).await;
    let refused = refused_streams(&mut flood, 16).await;
    assert!(
        refused.iter().all(|id| *id > 7),
        "streams 1-7 were accepted"
    );

    let mut probe = health_client(&broker).await;
    assert_eq!(
        health_status(&mut probe, "").await.expect("probe answered"),
        ServingStatus::Serving as i32
    );
    drop(flood);
    broker.stop().await;
}

#[tokio::test]
async fn request_whose_body_never_arrives_is_ended_at_the_request_timeout() {
    let broker = broker_with(|limits| limits.request_timeout = Duration::from_millis(500)).await;
    let mut slow = tls_connect(broker.addr, client_tls(&broker))
        .await
        .expect("mTLS");
    raw_h2_start(&mut slow).await;
    open_unfinished_streams(&mut slow, 1, "https", GET_IDP_TOKEN).await;
    bounded("the server ends stream 1", async {
        loop {
            let frame = read_frame(&mut slow).await.expect("connection open");
            let ends_stream = frame.kind == RST_STREAM
                || (frame.kind == HEADERS && frame.flags & END_STREAM != 0);
            if frame.stream == 1 && ends_stream {
                return;
            }
        }
    })
    .await;
    broker.stop().await;
}

// ---- connections ---------------------------------------------------------

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let broker = broker_with(|limits| {
        limits.max_connections = 4;
        limits.first_request_timeout = Duration::from_secs(60);
    })
    .await;
    let tls = client_tls(&broker);
    let mut held = Vec::new();
    for _ in 0..4 {
        let connection = bounded(
            "one of the first four",
            tls_connect(broker.addr, tls.clone()),
        )
        .await
        .expect("within the cap");
        held.push(connection);
    }
    let fifth = tokio::spawn(tls_connect(broker.addr, tls.clone()));
    tokio::time::sleep(NOT_WITHIN).await;
    assert!(
        !fifth.is_finished(),
        "a fifth connection is not handshaken while four are open"
    );

    drop(held);
    let fifth = bounded("the fifth connection", fifth)
        .await
        .expect("task")
        .expect("handshaken once the others closed");
    drop(fifth);
    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("a client works again");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    broker.stop().await;
}

#[tokio::test]
async fn connection_silent_after_the_handshake_is_closed_at_the_first_request_timeout() {
    let broker =
        broker_with(|limits| limits.first_request_timeout = Duration::from_millis(300)).await;
    let mut silent = tls_connect(broker.addr, client_tls(&broker))
        .await
        .expect("mTLS");
    assert!(
        closed_within(&mut silent, CLOSED_WITHIN).await,
        "closed for sending no HTTP/2 preface"
    );
    broker.stop().await;
}

#[tokio::test]
async fn silent_plaintext_health_connection_is_closed_at_the_first_request_timeout() {
    let broker =
        broker_with(|limits| limits.first_request_timeout = Duration::from_millis(300)).await;
    let addr = broker.health_addr.expect("health port");
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    assert!(closed_within(&mut silent, CLOSED_WITHIN).await);
    broker.stop().await;
}

#[tokio::test]
async fn silent_tcp_connection_is_closed_at_the_handshake_timeout() {
    let broker = broker_with(|limits| limits.handshake_timeout = Duration::from_millis(300)).await;
    let mut silent = TcpStream::connect(broker.addr).await.expect("connect");
    assert!(
        closed_within(&mut silent, CLOSED_WITHIN).await,
        "closed for never starting the TLS handshake"
    );
    broker.stop().await;
}

#[tokio::test]
async fn handshakes_beyond_the_cap_wait_while_established_clients_keep_working() {
    let broker = broker_with(|limits| {
        limits.max_pending_handshakes = 4;
        limits.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let mut established = broker.client().await;
    get_on(&mut established, get_request(seed::GITHUB_USER, "github"))
        .await
        .expect("before the flood");

    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(TcpStream::connect(broker.addr).await.expect("TCP connect"));
    }
    let token = get_on(&mut established, get_request(seed::GITHUB_USER, "github"))
        .await
        .expect("an established connection is untouched by pending handshakes");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    let newcomer = tokio::spawn(tls_connect(broker.addr, client_tls(&broker)));
    tokio::time::sleep(NOT_WITHIN).await;
    assert!(
        !newcomer.is_finished(),
        "no fifth handshake starts while four are pending"
    );

    drop(silent);
    bounded("the newcomer's handshake", newcomer)
        .await
        .expect("task")
        .expect("handshaken once the silent ones went away");
    broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("new clients are served again");
    broker.stop().await;
}

// ---- keepalive and long requests -----------------------------------------

#[tokio::test]
async fn peer_that_does_not_answer_keepalive_pings_is_disconnected() {
    let broker = broker_with(|limits| {
        limits.keepalive_interval = Duration::from_millis(200);
        limits.keepalive_timeout = Duration::from_millis(200);
        limits.first_request_timeout = Duration::from_secs(60);
    })
    .await;
    let mut mute = tls_connect(broker.addr, client_tls(&broker))
        .await
        .expect("mTLS");
    raw_h2_start(&mut mute).await;
    let mut pinged = false;
    let closed = tokio::time::timeout(CLOSED_WITHIN, async {
        while let Ok(frame) = read_frame(&mut mute).await {
            pinged |= frame.kind == PING && frame.flags & ACK == 0;
        }
    })
    .await
    .is_ok();
    assert!(pinged, "the server pinged the idle connection");
    assert!(closed, "and closed it when the ping went unanswered");
    broker.stop().await;
}

/// A GetIdpToken request body: the gRPC length-prefixed message.
fn grpc_message(request: &GetIdpTokenRequest) -> Bytes {
    let encoded = request.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend(u32::try_from(encoded.len()).expect("small").to_be_bytes());
    framed.extend(encoded);
    Bytes::from(framed)
}

#[tokio::test]
async fn idle_connection_that_sent_its_preface_is_kept_open_by_keepalive() {
    let broker = broker_with(|limits| {
        limits.first_request_timeout = Duration::from_millis(300);
        limits.keepalive_interval = Duration::from_millis(200);
        limits.keepalive_timeout = Duration::from_secs(2);
    })
    .await;
    let tls = tls_connect(broker.addr, client_tls(&broker))
        .await
        .expect("mTLS");
    let (send, connection) = bounded("h2 handshake", h2::client::handshake(tls))
        .await
        .expect("h2");
    let connection = tokio::spawn(connection);
    // Several keepalive intervals and first-request timeouts without a request.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !connection.is_finished(),
        "the idle connection is still open"
    );

    let mut send = bounded("stream capacity", send.ready())
        .await
        .expect("ready");
    let request = http::Request::post(format!("https://localhost{GET_IDP_TOKEN}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut body) = send.send_request(request, false).expect("send");
    body.send_data(
        grpc_message(&get_request(seed::GITHUB_USER, "github")),
        true,
    )
    .expect("body");
    let response = bounded("response", response).await.expect("response");
    let mut received = response.into_body();
    let mut message = Vec::new();
    while let Some(chunk) = bounded("data", received.data()).await {
        let chunk = chunk.expect("chunk");
        let _ = received.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let trailers = bounded("trailers", received.trailers())
        .await
        .expect("trailers")
        .expect("present");
    assert_eq!(
        trailers.get("grpc-status").map(|value| value.as_bytes()),
        Some(&b"0"[..])
    );
    let answer = GetIdpTokenResponse::decode(message.get(5..).expect("prefix")).expect("decodes");
    assert_eq!(
        answer.token.expect("token").access_token,
        seed::GITHUB_ACCESS_TOKEN
    );
    broker.stop().await;
}

#[tokio::test]
async fn rpc_in_flight_is_not_cut_by_the_first_request_timeout() {
    let broker =
        broker_with(|limits| limits.first_request_timeout = Duration::from_millis(300)).await;
    broker.emulator.set_latency(Duration::from_millis(1500));
    let token = broker
        .get(seed::GITHUB_USER, "github")
        .await
        .expect("a slow RPC completes");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    broker.stop().await;
}
