//! The fleet's one Auth0 budget: `--auth0-rate-limit` and `--auth0-burst`
//! for all replicas together, as a GCRA in one Redis key ([`BUDGET`]), so N
//! replicas never spend N times the tenant-wide quota. `auth0::outbound`
//! asks it for every Management API request; when Redis cannot answer it
//! says so and the replica's own limiter decides.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::keys::KEY_PREFIX;
use super::scripts::BUDGET;
use super::{metrics, Core};
use crate::auth0::{SharedAdmission, SharedBudget};

/// The budget as one key in Redis.
pub(super) struct FleetBudget {
    core: Arc<Core>,
    /// Where the theoretical arrival time lives.
    key: String,
    /// Microseconds between two requests at the sustained rate.
    interval_us: u64,
    burst: u32,
}

impl FleetBudget {
    /// A budget of `rate` requests per second with `burst` at once.
    pub(super) fn new(core: Arc<Core>, rate: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            core,
            key: format!("{KEY_PREFIX}auth0-budget"),
            interval_us: 1_000_000u64.div_ceil(u64::from(rate.get())),
            burst: burst.get(),
        }
    }

    async fn take(&self) -> SharedAdmission {
        let mut script = BUDGET.key(&self.key);
        script.arg(self.interval_us).arg(self.burst);
        match self.core.link.run::<u64>("budget", &script).await {
            None => SharedAdmission::Unavailable,
            Some(0) => SharedAdmission::Go,
            Some(wait_us) if wait_us > self.longest_honest_wait_us() => {
                // Only a key written by something else asks this: whoever
                // can write Redis must not stop the fleet's Auth0 reads.
                metrics::error("budget_implausible");
                SharedAdmission::Unavailable
            }
            Some(wait_us) => {
                metrics::budget_wait();
                SharedAdmission::Wait(Duration::from_micros(wait_us))
            }
        }
    }

    /// The GCRA never asks for more than one interval while the key holds
    /// what this budget wrote; replicas configured with other limits (a
    /// rollout changing them) may ask for up to their burst. Past this the
    /// key is not the budget's.
    fn longest_honest_wait_us(&self) -> u64 {
        let slack = Duration::from_secs(1).as_micros() as u64;
        self.interval_us
            .saturating_mul(u64::from(self.burst).saturating_add(2))
            .saturating_add(slack)
    }
}

impl SharedBudget for FleetBudget {
    fn admit(&self) -> BoxFuture<'_, SharedAdmission> {
        Box::pin(self.take())
    }
}
