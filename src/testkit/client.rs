//! mTLS clients of a broker on loopback, presenting whichever certificate a
//! test or the benchmark chooses (or none).

use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::pki::IssuedCertificate;
use crate::proto::token_broker_client::TokenBrokerClient;

/// How long a connection attempt may take, so a test against a broker that
/// does not answer fails instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An mTLS channel to a broker at `addr`, trusting `ca_pem` for the server
/// (named `localhost`, as [`crate::pki::LeafSpec::loopback_server`] is) and
/// presenting `cert`, or no certificate at all.
pub async fn mtls_channel(
    addr: SocketAddr,
    ca_pem: &str,
    cert: Option<&IssuedCertificate>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(cert) = cert {
        tls = tls.identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("a socket address makes a valid URI")
        .tls_config(tls)?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
}

/// A `TokenBroker` client over [`mtls_channel`].
pub async fn mtls_client(
    addr: SocketAddr,
    ca_pem: &str,
    cert: Option<&IssuedCertificate>,
) -> Result<TokenBrokerClient<Channel>, tonic::transport::Error> {
    Ok(TokenBrokerClient::new(
        mtls_channel(addr, ca_pem, cert).await?,
    ))
}
