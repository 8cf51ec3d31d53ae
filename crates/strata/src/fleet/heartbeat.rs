//! The heartbeat: this instance's liveness and last sequence number, for the others'
//! gap detection, and the end-to-end check that the backplane delivers.

use std::sync::Arc;

use super::{Host, mark_unhealthy};
use crate::backplane::MessageBody;
use crate::shutdown::Stop;

/// Heartbeats missed before the backplane counts as unhealthy.
const MISSED_HEARTBEATS: u32 = 3;

/// Publishes a heartbeat every interval until stopped; marks the backplane unhealthy
/// when this instance's own heartbeats stop coming back.
pub(crate) async fn run<H: Host>(host: Arc<H>, mut stop: Stop) {
    let Some(fleet) = host.fleet() else { return };
    let every = fleet.config().heartbeat_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.stopped() => return,
        }
        // A failed heartbeat shows up below as our own heartbeat not coming back. It is
        // sent even while publishes fail: its success is what ends the outage. Below the
        // Strong level (which bypasses the cache instead) it says whether an L2 delete
        // of ours waits for its retry: the others then trust no old entry meanwhile.
        let body = if !fleet.config().strong && host.l2_buffered() {
            MessageBody::BufferedHeartbeat
        } else {
            MessageBody::Heartbeat
        };
        let _ = fleet.send_heartbeat(body, host.stats()).await;
        let now = host.now();
        let last = host.health().last_own_heartbeat();
        let missed = now.since(last) > every.saturating_mul(MISSED_HEARTBEATS);
        if host.health().is_subscribed() && missed {
            mark_unhealthy(&*host, last);
        }
    }
}
