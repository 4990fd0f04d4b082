//! What a broker's state reads as: Kafka's states in Strimzi's numbering, the recovery progress
//! and the view of one instant that the routes, metrics and `/v1/brokers` serialize.

use serde::Serialize;

/// Kafka's broker states with Strimzi's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaState {
    NotRunning,
    Starting,
    Recovery,
    Running,
    /// Never derived: the kernel cannot tell a controlled shutdown is pending (listed for
    /// completeness of the numbering).
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "not observable from the kernel")
    )]
    PendingControlledShutdown,
    ShuttingDown,
    /// What the agent cannot observe (see [`StateView::unknown`]).
    Unknown,
}

impl KafkaState {
    pub const fn number(self) -> u8 {
        match self {
            KafkaState::NotRunning => 0,
            KafkaState::Starting => 1,
            KafkaState::Recovery => 2,
            KafkaState::Running => 3,
            KafkaState::PendingControlledShutdown => 6,
            KafkaState::ShuttingDown => 7,
            KafkaState::Unknown => 127,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            KafkaState::NotRunning => "NOT_RUNNING",
            KafkaState::Starting => "STARTING",
            KafkaState::Recovery => "RECOVERY",
            KafkaState::Running => "RUNNING",
            KafkaState::PendingControlledShutdown => "PENDING_CONTROLLED_SHUTDOWN",
            KafkaState::ShuttingDown => "SHUTTING_DOWN",
            KafkaState::Unknown => "UNKNOWN",
        }
    }

    /// Strimzi's readiness: 3 ≤ state ≠ 127.
    pub const fn is_ready(self) -> bool {
        let n = self.number();
        n >= 3 && n != 127
    }
}

/// Recovery progress, summed over every log dir. Each value fits a Java int.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recovery {
    pub remaining_logs_to_recover: i32,
    pub remaining_segments_to_recover: i32,
}

/// A broker's state at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateView {
    pub state: KafkaState,
    /// Present in RECOVERY only.
    pub recovery: Option<Recovery>,
    /// Why the state is UNKNOWN: what the agent cannot observe (present then only).
    pub unknown: Option<&'static str>,
}

impl StateView {
    pub const fn of(state: KafkaState) -> Self {
        StateView {
            state,
            recovery: None,
            unknown: None,
        }
    }

    pub const fn unknown(why: &'static str) -> Self {
        StateView {
            state: KafkaState::Unknown,
            recovery: None,
            unknown: Some(why),
        }
    }

    pub(super) const fn recovering(recovery: Recovery) -> Self {
        StateView {
            state: KafkaState::Recovery,
            recovery: Some(recovery),
            unknown: None,
        }
    }
}

impl Serialize for StateView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("StateView", 3)?;
        st.serialize_field("name", self.state.name())?;
        st.serialize_field("number", &self.state.number())?;
        if let Some(r) = &self.recovery {
            st.serialize_field("recovery", r)?;
        }
        if let Some(why) = self.unknown {
            st.serialize_field("unknown", why)?;
        }
        st.end()
    }
}
