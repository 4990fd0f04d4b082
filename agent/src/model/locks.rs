//! The model's locks, taken whatever a holder that panicked left behind: a poisoned lock's data
//! is used as it is (every write under them leaves it whole), so one panicking request or
//! thread never takes the model down with it.

use std::sync::{
    LockResult, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

/// What a lock operation gave, poisoned or not.
pub(super) fn recover<G>(result: LockResult<G>) -> G {
    result.unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    recover(mutex.lock())
}

pub(super) fn read<T>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    recover(rwlock.read())
}

pub(super) fn write<T>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    recover(rwlock.write())
}
