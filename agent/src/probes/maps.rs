//! Helpers every hook family's loader shares: taking maps out of the loaded object, summing
//! per-CPU counters, draining a ring buffer into a bounded channel. Below the loaders; it knows
//! none of them.

use std::{os::fd::AsFd as _, path::Path, time::Duration};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use tokio::io::unix::AsyncFd;

use super::{batch, error::ProbesError};

/// Drains ring buffer `name` on the runtime into a bounded channel of what `parse` makes of
/// each record. When the consumer falls behind, records are dropped and `lost` is sent once
/// there is room, so the consumer knows to catch up another way: nothing grows.
///
/// With `recheck`, the kernel side commits some records without waking the reader (see
/// `EXEC_WAKE_EVERY_NS`): after a drain that found records, the ring is drained again
/// `recheck` later whether or not a wake-up came, until a drain on that timer finds nothing.
pub(super) fn spawn_ring_channel<S: Clone + Send + 'static>(
    ebpf: &mut Ebpf,
    name: &'static str,
    capacity: usize,
    parse: fn(&[u8]) -> Option<S>,
    lost: S,
    recheck: Option<Duration>,
) -> Result<tokio::sync::mpsc::Receiver<S>, ProbesError> {
    use tokio::sync::mpsc::error::TrySendError;
    let ring: aya::maps::RingBuf<MapData> = take_map(ebpf, name)?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same while the AsyncFd
    // owns the ring buffer.
    let mut ring =
        unsafe { AsyncFd::register(ring) }.map_err(|e| ProbesError::LogFd(e.into_parts().1))?;
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    // Records read, or None once the consumer is gone.
    let drain = move |ring: &mut aya::maps::RingBuf<MapData>| -> Option<usize> {
        let mut found = 0;
        while let Some(item) = ring.next() {
            found += 1;
            let Some(signal) = parse(&item) else { continue };
            match tx.try_send(signal) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    let _ = tx.try_send(lost.clone());
                }
                Err(TrySendError::Closed(_)) => return None,
            }
        }
        Some(found)
    };
    crate::tasks::spawn(name, async move {
        let mut again_at: Option<tokio::time::Instant> = None;
        loop {
            let woken = match again_at {
                Some(at) => tokio::time::timeout_at(at, ring.readable_mut()).await.ok(),
                None => Some(ring.readable_mut().await),
            };
            let (found, on_timer) = match woken {
                Some(Ok(mut guard)) => {
                    let found = drain(guard.get_inner_mut());
                    guard.clear_ready();
                    (found, false)
                }
                Some(Err(e)) => {
                    tracing::warn!(map = name, error = %e, "ring buffer reader stopped");
                    return;
                }
                None => (drain(ring.get_mut()), true),
            };
            let Some(found) = found else { return };
            // An empty drain on a wake-up keeps the timer: the records it has to catch may be
            // committed after it.
            if found > 0 {
                again_at = recheck.map(|d| tokio::time::Instant::now() + d);
            } else if on_timer {
                again_at = None;
            }
        }
    });
    Ok(rx)
}

/// Takes map `name` out of the object as a typed handle.
/// A duplicate of map `name`'s descriptor, the map staying with the object.
pub(super) fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<std::os::fd::OwnedFd, ProbesError> {
    let (Some(aya::maps::Map::HashMap(data)) | Some(aya::maps::Map::Array(data))) = ebpf.map(name)
    else {
        return Err(ProbesError::Missing {
            kind: "hash map or array",
            name,
        });
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| ProbesError::Link {
            program: name,
            source,
        })
}

pub(super) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbesError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(ProbesError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(map_error(name))
}

/// Turns an error of an operation on map `name` into a [`ProbesError`] naming the map.
pub(super) fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> ProbesError + Copy {
    move |e| ProbesError::Map {
        name,
        source: Box::new(e),
    }
}

pub(super) fn take_per_cpu_array(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuArray<MapData, u64>, ProbesError> {
    take_map(ebpf, name)
}

pub(super) fn take_ring(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<aya::maps::RingBuf<MapData>, ProbesError> {
    take_map(ebpf, name)
}

pub(super) fn sum_per_cpu(array: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    array
        .get(&index, 0)
        .map(|values| values.iter().sum())
        .unwrap_or(0)
}

/// Slots `0..len` of a per-CPU counter array, each summed over CPUs: one batch read, or a
/// lookup per slot where the kernel does not batch arrays.
pub(super) fn per_cpu_sums(
    batched: &batch::Batched<u32, u64>,
    array: &PerCpuArray<MapData, u64>,
    len: usize,
) -> Vec<u64> {
    let mut sums = vec![0; len];
    match batched.read() {
        Ok(slots) => {
            for (index, values) in slots {
                if let Some(sum) = sums.get_mut(index as usize) {
                    *sum = values.iter().sum();
                }
            }
        }
        Err(_) => {
            for (index, sum) in sums.iter_mut().enumerate() {
                *sum = sum_per_cpu(array, index as u32);
            }
        }
    }
    sums
}

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, ProbesError> {
    std::fs::read(path).map_err(|source| ProbesError::Read {
        path: path.display().to_string(),
        source,
    })
}
