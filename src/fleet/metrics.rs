//! The shared tier's metrics: fixed label vocabularies, never a user id or
//! key name. Without an exporter the calls are no-ops.

use metrics::{counter, describe_counter, describe_gauge, gauge};

/// Describes the fleet's metrics (called where the exporter is installed).
pub fn describe() {
    describe_counter!(
        "tokenbroker_fleet_lookups_total",
        "Shared-tier lookups after a local miss, by outcome: hit, miss (this replica reads Auth0), undecryptable (another key: a miss)"
    );
    describe_counter!(
        "tokenbroker_fleet_token_lookups_total",
        "Shared-tier lookups of kept tokens (kind: idp refreshes, vault exchanges) after a local miss, by outcome: hit, miss (this replica fetches), undecryptable"
    );
    describe_counter!(
        "tokenbroker_fleet_lock_waits_total",
        "Reads, refreshes and exchanges that waited for another replica's of the same user (and connection)"
    );
    describe_counter!(
        "tokenbroker_fleet_lock_wait_timeouts_total",
        "Waits for another replica's read given up (deadline or lock life): this replica read Auth0 itself"
    );
    describe_counter!(
        "tokenbroker_fleet_budget_waits_total",
        "Auth0 requests told to wait by the fleet's shared budget"
    );
    describe_counter!(
        "tokenbroker_fleet_errors_total",
        "Redis calls that failed or timed out, by operation"
    );
    describe_counter!(
        "tokenbroker_fleet_outages_total",
        "Times this replica left shared mode (Redis failed, slow, or the channel dropped)"
    );
    describe_gauge!(
        "tokenbroker_fleet_shared",
        "1 in shared mode, 0 while serving alone (Redis unreachable or not yet connected)"
    );
    describe_counter!(
        "tokenbroker_fleet_invalidations_total",
        "Invalidations by direction: sent, received, undecryptable (another key: everything held is dropped), dropped (kept too many during an outage)"
    );
}

pub(super) fn shared_lookup(outcome: &'static str) {
    counter!("tokenbroker_fleet_lookups_total", "outcome" => outcome).increment(1);
}

pub(super) fn token_lookup(kind: &'static str, outcome: &'static str) {
    counter!("tokenbroker_fleet_token_lookups_total", "kind" => kind, "outcome" => outcome)
        .increment(1);
}

pub(super) fn lock_wait() {
    counter!("tokenbroker_fleet_lock_waits_total").increment(1);
}

pub(super) fn lock_wait_gave_up() {
    counter!("tokenbroker_fleet_lock_wait_timeouts_total").increment(1);
}

pub(super) fn budget_wait() {
    counter!("tokenbroker_fleet_budget_waits_total").increment(1);
}

pub(super) fn error(op: &'static str) {
    counter!("tokenbroker_fleet_errors_total", "op" => op).increment(1);
}

pub(super) fn outage() {
    counter!("tokenbroker_fleet_outages_total").increment(1);
}

pub(super) fn shared_mode(shared: bool) {
    gauge!("tokenbroker_fleet_shared").set(if shared { 1.0 } else { 0.0 });
}

pub(super) fn invalidation_sent() {
    counter!("tokenbroker_fleet_invalidations_total", "direction" => "sent").increment(1);
}

pub(super) fn invalidation_received() {
    counter!("tokenbroker_fleet_invalidations_total", "direction" => "received").increment(1);
}

pub(super) fn invalidation_undecryptable() {
    counter!("tokenbroker_fleet_invalidations_total", "direction" => "undecryptable").increment(1);
}

pub(super) fn invalidation_dropped() {
    counter!("tokenbroker_fleet_invalidations_total", "direction" => "dropped").increment(1);
}
