//! Synchronisation: the workspace's one poison-tolerant lock helper, and the primitives the
//! core's own code uses, swapped for loom's under `--cfg loom` so the model tests explore every
//! interleaving of the revoke protocol and the fabric's DMA path. Reference counts stay
//! `std::sync::Arc`: importers are handed in as `Arc<dyn Importer>` and loom need not model them.
//!
//! Every crate of the workspace locks through [`lock`], [`read`], [`write`](write()), [`try_lock`],
//! [`wait`] and [`wait_timeout`]: a thread that panicked while holding a lock must not turn
//! every later revoke, completion or transfer into a panic. Each critical section leaves its data
//! consistent before anything in it can panic, so the data behind a poisoned lock is sound and
//! is used as it is.
//!
//! ```
//! use std::sync::{Condvar, Mutex};
//! use std::time::Duration;
//! use dmaplane_core::sync::{lock, wait_timeout};
//!
//! let m = Mutex::new(1);
//! let cv = Condvar::new();
//! // A panic under the lock poisons it; the helper still hands out the data.
//! let _ = std::panic::catch_unwind(|| {
//!     let _g = lock(&m);
//!     panic!("poisoned on purpose");
//! });
//! *lock(&m) += 1;
//! let (g, timed_out) = wait_timeout(&cv, lock(&m), Duration::from_millis(1));
//! assert_eq!((*g, timed_out), (2, true));
//! ```

use std::time::Duration;

#[cfg(loom)]
pub(crate) use loom::sync::{
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
#[cfg(loom)]
pub(crate) mod atomic {
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
}

#[cfg(not(loom))]
#[allow(unused_imports)] // the guard types are named under loom only
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
#[cfg(not(loom))]
pub(crate) mod atomic {
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
}

/// A mutex that [`lock`] takes whether or not it was poisoned.
pub trait Lock {
    /// What holding the lock gives.
    type Guard<'a>
    where
        Self: 'a;
    /// Lock, recovering the guard from a poisoned lock.
    fn lock_unpoisoned(&self) -> Self::Guard<'_>;
}

/// A reader-writer lock that [`read`] and [`write`](write()) take whether or not it was poisoned.
pub trait ReadWrite {
    /// What a shared hold gives.
    type Read<'a>
    where
        Self: 'a;
    /// What the exclusive hold gives.
    type Write<'a>
    where
        Self: 'a;
    /// A shared hold, recovered from a poisoned lock.
    fn read_unpoisoned(&self) -> Self::Read<'_>;
    /// The exclusive hold, recovered from a poisoned lock.
    fn write_unpoisoned(&self) -> Self::Write<'_>;
}

/// A condition variable that [`wait`] and [`wait_timeout`] wait on whether or not its mutex
/// was poisoned.
/// `G` is the guard of the mutex waited with.
pub trait Wait<G> {
    /// Wait for a notification.
    fn wait_unpoisoned(&self, guard: G) -> G;
    /// Wait at most `timeout`; `true` when it ran out.
    fn wait_timeout_unpoisoned(&self, guard: G, timeout: Duration) -> (G, bool);
}

/// Lock `m`, recovering the data if a panicking thread poisoned it.
pub fn lock<L: Lock + ?Sized>(m: &L) -> L::Guard<'_> {
    m.lock_unpoisoned()
}

/// Read-lock `l`, recovering the data if a panicking thread poisoned it.
pub fn read<L: ReadWrite + ?Sized>(l: &L) -> L::Read<'_> {
    l.read_unpoisoned()
}

/// Write-lock `l`, recovering the data if a panicking thread poisoned it.
pub fn write<L: ReadWrite + ?Sized>(l: &L) -> L::Write<'_> {
    l.write_unpoisoned()
}

/// The guard if the mutex is free now (poisoned or not); `None` if someone holds it.
pub fn try_lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Wait on `cv` with `guard`, recovering the guard if the mutex was poisoned meanwhile.
pub fn wait<G, C: Wait<G> + ?Sized>(cv: &C, guard: G) -> G {
    cv.wait_unpoisoned(guard)
}

/// Wait on `cv` with `guard` for at most `timeout`: the guard back and whether the time ran out.
pub fn wait_timeout<G, C: Wait<G> + ?Sized>(cv: &C, guard: G, timeout: Duration) -> (G, bool) {
    cv.wait_timeout_unpoisoned(guard, timeout)
}

/// The impls for one family of locks (std's, and loom's under `--cfg loom`): the same code,
/// written once.
macro_rules! unpoison {
    ($($sync:ident)::+) => {
        impl<T: ?Sized> Lock for $($sync)::+::Mutex<T> {
            type Guard<'a>
                = $($sync)::+::MutexGuard<'a, T>
            where
                Self: 'a;
            fn lock_unpoisoned(&self) -> Self::Guard<'_> {
                self.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
            }
        }

        impl<T: ?Sized> ReadWrite for $($sync)::+::RwLock<T> {
            type Read<'a>
                = $($sync)::+::RwLockReadGuard<'a, T>
            where
                Self: 'a;
            type Write<'a>
                = $($sync)::+::RwLockWriteGuard<'a, T>
            where
                Self: 'a;
            fn read_unpoisoned(&self) -> Self::Read<'_> {
                self.read().unwrap_or_else(std::sync::PoisonError::into_inner)
            }
            fn write_unpoisoned(&self) -> Self::Write<'_> {
                self.write().unwrap_or_else(std::sync::PoisonError::into_inner)
            }
        }

        impl<'a, T> Wait<$($sync)::+::MutexGuard<'a, T>> for $($sync)::+::Condvar {
            fn wait_unpoisoned(
                &self,
                guard: $($sync)::+::MutexGuard<'a, T>,
            ) -> $($sync)::+::MutexGuard<'a, T> {
                self.wait(guard)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            }
            fn wait_timeout_unpoisoned(
                &self,
                guard: $($sync)::+::MutexGuard<'a, T>,
                timeout: Duration,
            ) -> ($($sync)::+::MutexGuard<'a, T>, bool) {
                let (g, r) = self
                    .wait_timeout(guard, timeout)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                (g, r.timed_out())
            }
        }
    };
}

unpoison!(std::sync);
#[cfg(loom)]
unpoison!(loom::sync);

/// Shared locks lock through the `Arc` (a generic argument is not dereferenced for us).
impl<L: Lock + ?Sized> Lock for std::sync::Arc<L> {
    type Guard<'a>
        = L::Guard<'a>
    where
        Self: 'a;
    fn lock_unpoisoned(&self) -> Self::Guard<'_> {
        (**self).lock_unpoisoned()
    }
}

impl<L: ReadWrite + ?Sized> ReadWrite for std::sync::Arc<L> {
    type Read<'a>
        = L::Read<'a>
    where
        Self: 'a;
    type Write<'a>
        = L::Write<'a>
    where
        Self: 'a;
    fn read_unpoisoned(&self) -> Self::Read<'_> {
        (**self).read_unpoisoned()
    }
    fn write_unpoisoned(&self) -> Self::Write<'_> {
        (**self).write_unpoisoned()
    }
}

/// The data of a mutex held exclusively (`&mut`), recovered if a panicking thread poisoned it.
pub fn get_mut<T: ?Sized>(m: &mut std::sync::Mutex<T>) -> &mut T {
    m.get_mut()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
