//! placeholder

use crate::support::TestBroker;
use tokenbroker::emulator::seed;

#[tokio::test]
async fn github_token_is_released_with_a_numeric_id_as_text() {
    let broker = TestBroker::start().await;
    let token = broker.get(seed::GITHUB_USER, "github").await.expect("token");
    assert_eq!(token.access_token, seed::GITHUB_ACCESS_TOKEN);
    assert_eq!(token.idp_user_id, "1234567");
    broker.stop().await;
}
