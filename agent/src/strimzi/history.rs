//! The bounded history of a broker's state changes, and the log line each change writes.

use std::collections::VecDeque;

use serde::Serialize;

use super::view::KafkaState;
use crate::broker::Broker;

/// One logged state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateChange {
    /// RFC 3339, UTC.
    pub at: String,
    pub pid: u32,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub number: u8,
}

/// State changes kept per broker (oldest dropped first).
pub const MAX_CHANGES: usize = 32;

/// Records a change of broker `broker` to `state` if it is one (`current`: the last state
/// derived), logging it and dropping the oldest beyond [`MAX_CHANGES`].
pub(super) fn record(
    current: &mut Option<KafkaState>,
    changes: &mut VecDeque<StateChange>,
    broker: &Broker,
    state: KafkaState,
) {
    if *current == Some(state) {
        return;
    }
    let change = StateChange {
        at: now_rfc3339(),
        pid: broker.pid,
        from: current.map(KafkaState::name),
        to: state.name(),
        number: state.number(),
    };
    tracing::info!(
        broker = %broker.id,
        pid = broker.pid,
        from = change.from.unwrap_or("-"),
        to = change.to,
        "broker state changed"
    );
    if changes.len() == MAX_CHANGES {
        changes.pop_front();
    }
    changes.push_back(change);
    *current = Some(state);
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
