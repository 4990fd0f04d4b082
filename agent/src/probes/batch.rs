//! Whole-map reads with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+ for hash maps, 5.9+ for arrays),
//! which aya 0.14 does not offer: a scrape reads each map in one or a few system calls instead
//! of two per entry (next key, then lookup). When the kernel refuses the command, the caller
//! reads entry by entry as before.

use std::{
    marker::PhantomData,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
};

use aya::Ebpf;

use super::{error::ProbesError, sys::sys_bpf};

/// Bytes of keys and values asked per call: bounds the buffers a read allocates, whatever the
/// map's capacity, and keeps them under glibc's mmap threshold (128 KiB), so a read is not a
/// fresh mapping and its page faults each time.
const CHUNK_BYTES: usize = 32 * 1024;

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// A map read whole, `K` to `V`; `V` per CPU when opened with [`Batched::per_cpu`].
pub struct Batched<K, V> {
    fd: OwnedFd,
    /// Values per key: 1, or the number of possible CPUs for a per-CPU map.
    cpus: usize,
    _types: PhantomData<(K, V)>,
}

impl<K: Copy, V: Copy> Batched<K, V> {
    /// Map `name` of `ebpf`, through a descriptor of its own (the map may be taken by a reader).
    pub fn open(ebpf: &Ebpf, name: &'static str) -> Result<Self, ProbesError> {
        Self::with_cpus(ebpf, name, 1)
    }

    /// A per-CPU map: each key has a value per possible CPU.
    pub fn per_cpu(ebpf: &Ebpf, name: &'static str) -> Result<Self, ProbesError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, source)| ProbesError::Read {
            path: what.to_string(),
            source,
        })?;
        Self::with_cpus(ebpf, name, cpus)
    }

    fn with_cpus(ebpf: &Ebpf, name: &'static str, cpus: usize) -> Result<Self, ProbesError> {
        let map = ebpf
            .map(name)
            .and_then(map_data)
            .ok_or(ProbesError::Missing { kind: "map", name })?;
        let fd = map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| ProbesError::Read {
                path: name.to_string(),
                source,
            })?;
        Ok(Self {
            fd,
            cpus,
            _types: PhantomData,
        })
    }

    /// Every entry, each key with its values (one, or one per CPU). An error means the kernel
    /// does not batch this map type, or the map changed shape mid-read.
    pub fn read(&self) -> std::io::Result<Vec<(K, Vec<V>)>> {
        let mut out = Vec::new();
        self.walk(|key, values| out.push((key, values.collect())))?;
        Ok(out)
    }

    /// Every entry with its single value (maps that are not per CPU).
    pub fn read_single(&self) -> std::io::Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        self.walk(|key, values| {
            if let Some(value) = values.next() {
                out.push((key, value));
            }
        })?;
        Ok(out)
    }

    /// The first `n` entries with their single value: an array's indexes `0..n`, without
    /// copying the rest of it.
    pub fn read_first(&self, n: usize) -> std::io::Result<Vec<(K, V)>> {
        let mut out = Vec::with_capacity(n);
        if n > 0 {
            self.walk_up_to(n, |key, values| {
                if let Some(value) = values.next() {
                    out.push((key, value));
                }
            })?;
        }
        Ok(out)
    }

    /// How many entries the map holds.
    pub fn count(&self) -> std::io::Result<u64> {
        let mut n = 0;
        self.walk(|_, _| n += 1)?;
        Ok(n)
    }

    /// Calls `f` with each entry's key and values, a chunk of entries per system call.
    fn walk(&self, f: impl FnMut(K, &mut dyn Iterator<Item = V>)) -> std::io::Result<()> {
        self.walk_up_to(usize::MAX, f)
    }

    /// [`Self::walk`], stopping after `limit` entries.
    fn walk_up_to(
        &self,
        limit: usize,
        mut f: impl FnMut(K, &mut dyn Iterator<Item = V>),
    ) -> std::io::Result<()> {
        // Per-CPU values are laid out at 8-byte strides, one per possible CPU.
        let stride = size_of::<V>().next_multiple_of(8);
        let per_key = if self.cpus > 1 {
            stride * self.cpus
        } else {
            size_of::<V>()
        };
        // Elements per call: at least 8 (the kernel returns ENOSPC when one hash bucket holds
        // more than asked), at most 256.
        let chunk = (CHUNK_BYTES / (size_of::<K>() + per_key)).clamp(8, 256);
        let mut keys = vec![0u8; chunk * size_of::<K>()];
        let mut values = vec![0u8; chunk * per_key];
        // The batch token is the bucket (hash) or index (array) to go on from: a u32 for both.
        let mut token = 0u32;
        let mut first = true;
        let mut left = limit;
        loop {
            let mut next = 0u32;
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { (&raw const token) as u64 },
                out_batch: (&raw mut next) as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk.min(left) as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: the attribute's buffers hold `count` keys and values of the map's sizes
            // (the caller's K and V match the map's definition) and outlive the call; the
            // kernel writes the filled count back into `attr`.
            let done = match unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
                Ok(_) => false,
                // ENOENT: the walk reached the end; `count` says what this last call filled.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                Err(e) => return Err(e),
            };
            for i in 0..attr.count as usize {
                // SAFETY: the kernel filled `count` elements; K and V are plain integer
                // structs; unaligned reads because the buffers are bytes.
                let key = unsafe {
                    std::ptr::read_unaligned(keys.as_ptr().add(i * size_of::<K>()).cast::<K>())
                };
                let base = i * per_key;
                let mut value = (0..self.cpus).map(|cpu| {
                    // SAFETY: as above; `base + cpu * stride + size_of::<V>()` is within the
                    // element's `per_key` bytes.
                    unsafe {
                        std::ptr::read_unaligned(
                            values.as_ptr().add(base + cpu * stride).cast::<V>(),
                        )
                    }
                });
                f(key, &mut value);
            }
            left -= attr.count as usize;
            if done || left == 0 {
                return Ok(());
            }
            token = next;
            first = false;
        }
    }
}

/// The map behind the kinds read whole here.
fn map_data(map: &aya::maps::Map) -> Option<&aya::maps::MapData> {
    use aya::maps::Map;
    match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d) => Some(d),
        _ => None,
    }
}
