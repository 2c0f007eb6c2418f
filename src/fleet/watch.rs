//! The invalidation channel: every replica subscribes, and forgets a user
//! when another replica invalidates it. The message is the user id sealed
//! under the cache key (with the sender's replica id, so a replica skips its
//! own), so nothing readable travels through Redis.
//!
//! A replica that was not subscribed may have missed messages, so whenever
//! it (re)subscribes, at start or after an outage, it forgets everything it
//! holds before serving from it again: the shared tier and Auth0 refill it.
//! The watcher is also what brings the replica back to shared mode after an
//! outage: it probes Redis every [`TICK`] while the link is down.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::time::MissedTickBehavior;

use super::{metrics, Core, LocalTier, REPLICA_ID_BYTES};
use crate::user_id::UserId;

/// How often the watcher checks the link: the longest a recovered Redis
/// waits to be used again.
const TICK: Duration = Duration::from_millis(250);
/// Ticks between two PINGs on the channel's connection, which would
/// otherwise not notice a silently dead connection.
const PING_EVERY: u32 = 4;
/// How long subscribing and a channel PING may take (off the request path).
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(1);
/// Backoff between attempts to subscribe while Redis is unreachable.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a message on the channel says.
enum Invalidation {
    /// This replica sent it: it already forgot the user.
    Own,
    /// Forget this user.
    User(UserId),
}

/// The tiers an invalidation reaches, held weakly: the watcher stops when
/// they are gone.
struct Tiers(Vec<Weak<dyn LocalTier>>);

impl Tiers {
    fn alive(&self) -> bool {
        self.0.iter().any(|tier| tier.strong_count() > 0)
    }

    fn forget(&self, user_id: &UserId) {
        for tier in self.0.iter().filter_map(Weak::upgrade) {
            tier.forget(user_id);
        }
    }

    fn forget_all(&self) {
        for tier in self.0.iter().filter_map(Weak::upgrade) {
            tier.forget_all();
        }
    }
}

/// Follows the channel for as long as a tier lives, resubscribing after
/// every loss.
pub(super) async fn follow_channel(core: Arc<Core>, tiers: Vec<Weak<dyn LocalTier>>) {
    let local = Tiers(tiers);
    let mut backoff = MIN_BACKOFF;
    while local.alive() {
        match subscribe(&core).await {
            Ok((sink, stream)) => {
                backoff = MIN_BACKOFF;
                follow(&core, &local, sink, stream).await;
            }
            Err(error) => core.link.failed("subscribe", &error),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe(core: &Core) -> Result<(PubSubSink, PubSubStream), String> {
    let (mut sink, stream) = core.link.pubsub().await?.split();
    match tokio::time::timeout(CHANNEL_TIMEOUT, sink.subscribe(&core.channel)).await {
        Ok(Ok(())) => Ok((sink, stream)),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer to SUBSCRIBE within 1 s".to_owned()),
    }
}

/// One subscription: forgets what may have been missed, then applies
/// messages until the connection is lost; meanwhile brings the link back
/// up whenever Redis answers again.
async fn follow(core: &Core, local: &Tiers, mut sink: PubSubSink, mut stream: PubSubStream) {
    local.forget_all();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else {
                    core.link.failed("subscription", &"the channel's connection closed");
                    return;
                };
                receive(core, local, message.get_payload_bytes());
            }
            _ = ticker.tick() => {
                if !local.alive() {
                    return;
                }
                ticks = ticks.wrapping_add(1);
                if !core.link.is_up() {
                    bring_back(core).await;
                } else if ticks.is_multiple_of(PING_EVERY) && !ping(&mut sink).await {
                    core.link.failed("subscription", &"the channel's connection does not answer");
                    return;
                }
            }
        }
    }
}

/// Back to shared mode if Redis answers, sending what waited for it.
async fn bring_back(core: &Core) {
    if core.link.probe().await {
        core.link.recovered();
        core.replay_pending().await;
    }
}

async fn ping(sink: &mut PubSubSink) -> bool {
    matches!(
        tokio::time::timeout(CHANNEL_TIMEOUT, sink.ping::<redis::Value>()).await,
        Ok(Ok(_))
    )
}

/// Applies one message: forgets the user it names; a message that does not
/// open (another key) names nobody this replica can tell, so it forgets
/// everything.
fn receive(core: &Core, local: &Tiers, payload: &[u8]) {
    match core.read_invalidation(payload) {
        Some(Invalidation::Own) => {}
        Some(Invalidation::User(user_id)) => {
            metrics::invalidation_received();
            local.forget(&user_id);
        }
        None => {
            metrics::invalidation_undecryptable();
            tracing::warn!(
                "an invalidation on the channel does not open under this replica's cache key (another key?): dropping every cached user"
            );
            local.forget_all();
        }
    }
}

impl Core {
    /// What the sealed message `payload` says, if it opens under the key.
    fn read_invalidation(&self, payload: &[u8]) -> Option<Invalidation> {
        let plaintext = self.keys.open(self.channel.as_bytes(), payload)?;
        if plaintext.len() < REPLICA_ID_BYTES {
            return None;
        }
        let (replica, user_id) = plaintext.split_at(REPLICA_ID_BYTES);
        if replica == self.replica {
            return Some(Invalidation::Own);
        }
        let user_id = UserId::parse(std::str::from_utf8(user_id).ok()?).ok()?;
        Some(Invalidation::User(user_id))
    }
}
