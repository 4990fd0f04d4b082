//! Strimzi's heuristics: a followed process's facts -> its state (first match wins; their
//! limits are in docs/broker-state.md).

use std::time::Duration;

use super::listen::Listening;
use super::process::Process;
use super::view::{KafkaState, StateView};
use crate::broker::Broker;

/// A listening broker that opened no tracked segment for this long is past recovery even if
/// the estimate says segments remain (estimate wrong, events lost, segments deleted).
pub const QUIET: Duration = Duration::from_secs(5);

/// Broker `broker`'s state from what is known of its process `p` (`read`: see
/// [`StateTracker::evaluate`](super::tracker::StateTracker::evaluate)).
pub(super) fn derive(p: &mut Process, broker: &Broker, read: bool) -> StateView {
    if p.sigterm {
        return StateView::of(KafkaState::ShuttingDown);
    }
    if p.running {
        return StateView::of(KafkaState::Running);
    }
    if p.recovery_seen && !p.recovery_over {
        let quiet = p.last_open.is_none_or(|t| t.elapsed() >= QUIET);
        if p.inventory.segments_remaining == 0
            || (quiet && p.listening(broker, read) == Listening::Yes)
        {
            p.recovery_over = true;
        } else {
            return StateView::recovering(p.inventory.recovery());
        }
    }
    let listening = p.listening(broker, read);
    if listening == Listening::Yes {
        p.running = true;
        return StateView::of(KafkaState::Running);
    }
    if p.recovery_seen {
        // Recovered but not serving yet: Kafka stays in RECOVERY until it starts serving.
        return StateView::recovering(p.inventory.recovery());
    }
    if broker.evidence.files_stalled {
        // The root of what cannot be told: its listeners and log dirs are in those files.
        return StateView::unknown(FILES_STALLED);
    }
    if let Listening::Unknown(why) = listening {
        return StateView::unknown(why);
    }
    // Not listening: STARTING, unless a recovery could be going on unseen.
    match p.recovery_unseen(broker) {
        Some(why) => StateView::unknown(why),
        None => StateView::of(KafkaState::Starting),
    }
}

const FILES_STALLED: &str = "the broker's files could not be read in time";
