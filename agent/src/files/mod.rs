//! Files a broker's container controls, read on its behalf: confined to the process's own root,
//! regular files only, bounded in bytes, entries and time, and run off every lock.

pub mod confine;
pub mod workers;

pub use confine::{ConfinedError, ProcessRoot};
pub use workers::{WorkError, Workers};
