//! The agent's records kept in maps beside the counters (kernel side: agent-ebpf/src/records.rs,
//! types in `brokerscope_common::records`): since when the counters count, and the broker
//! records discovery continues from after a restart.

use std::time::{Duration, SystemTime};

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use brokerscope_common::records::{
    AGENT_META_MAP, AgentMeta, BROKER_RECORD_CHUNK, BROKER_RECORD_CHUNKS, BROKER_RECORDS_MAP,
    BROKER_RECORDS_MAX,
};

use super::{
    error::ProbesError,
    maps::{map_error, take_map},
};

/// Since when the counters in these maps count: the time the first agent wrote, or now if
/// none did (fresh maps). An adoption is counted.
pub fn counting_since(ebpf: &mut Ebpf, adopting: bool) -> Result<SystemTime, ProbesError> {
    let err = map_error(AGENT_META_MAP);
    let mut meta: Array<MapData, AgentMeta> = take_map(ebpf, AGENT_META_MAP)?;
    let mut value = meta.get(&0, 0).map_err(err)?;
    if value.created_unix_ns == 0 {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        value = AgentMeta {
            created_unix_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
            adoptions: 0,
        };
    } else if adopting {
        value.adoptions += 1;
    }
    meta.set(0, value, 0).map_err(err)?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_nanos(value.created_unix_ns))
}

/// `at` as RFC 3339, UTC.
pub fn rfc3339(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{at:?}"))
}

/// The broker records: one byte string, written whole when it changes.
pub struct BrokerRecords {
    map: Array<MapData, [u8; BROKER_RECORD_CHUNK]>,
    /// What the map holds.
    last: Vec<u8>,
}

impl BrokerRecords {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, ProbesError> {
        let mut records = Self {
            map: take_map(ebpf, BROKER_RECORDS_MAP)?,
            last: Vec::new(),
        };
        records.last = records.read();
        Ok(records)
    }

    /// What the map holds (empty if nothing, or if what is there is not a record string).
    pub fn read(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for chunk in 0..BROKER_RECORD_CHUNKS {
            match self.map.get(&chunk, 0) {
                Ok(value) => bytes.extend_from_slice(&value),
                Err(_) => return Vec::new(),
            }
        }
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
        match usize::try_from(len) {
            Ok(len) if len <= BROKER_RECORDS_MAX => bytes[8..8 + len].to_vec(),
            _ => Vec::new(),
        }
    }

    /// Replaces the records with `bytes` if they changed; the chunks past the string's end
    /// are left as they are (the length says where it ends).
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ProbesError> {
        if bytes == self.last {
            return Ok(());
        }
        if bytes.len() > BROKER_RECORDS_MAX {
            return Err(ProbesError::Held {
                reason: format!(
                    "broker records of {} bytes do not fit in {BROKER_RECORDS_MAX}",
                    bytes.len()
                ),
            });
        }
        let mut whole = (bytes.len() as u64).to_le_bytes().to_vec();
        whole.extend_from_slice(bytes);
        for (i, piece) in whole.chunks(BROKER_RECORD_CHUNK).enumerate() {
            let mut value = [0u8; BROKER_RECORD_CHUNK];
            value[..piece.len()].copy_from_slice(piece);
            self.map
                .set(i as u32, value, 0)
                .map_err(map_error(BROKER_RECORDS_MAP))?;
        }
        self.last = bytes.to_vec();
        Ok(())
    }
}
