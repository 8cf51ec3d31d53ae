//! The locks and atomics of the single-flight table, the fill guards and L1, in one
//! place so that the model checker can drive them.
//!
//! Outside this crate's unit tests these are `parking_lot`'s locks and `std`'s atomics,
//! re-exported: no wrapper, no cost. In the unit tests each one is either the real
//! primitive or [shuttle](https://docs.rs/shuttle)'s, chosen when it is created: inside
//! a shuttle execution the model's, so that every lock and atomic access is a point
//! where the checker may switch tasks (see `model_check`), elsewhere the real one, so
//! that the other unit tests run the cache as usual. Only the methods those modules
//! call exist.

#[cfg(not(test))]
pub(crate) use parking_lot::{Mutex, RwLock};
#[cfg(not(test))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64};

#[cfg(test)]
pub(crate) use checked::{AtomicBool, AtomicU64, Mutex, RwLock};

#[cfg(test)]
mod checked {
    use std::ops::{Deref, DerefMut};
    use std::sync::PoisonError;
    use std::sync::atomic::Ordering;

    /// Whether a primitive created now belongs to a shuttle execution.
    fn in_model() -> bool {
        shuttle::current::try_get_current_task().is_some()
    }

    /// Generates a guard enum over the real and the model's guard, dereferencing to `T`.
    macro_rules! guard {
        ($name:ident, $real:ident, $model:ident, $($mut:ident)?) => {
            pub(crate) enum $name<'a, T> {
                Real(parking_lot::$real<'a, T>),
                Model(shuttle::sync::$model<'a, T>),
            }

            impl<T> Deref for $name<'_, T> {
                type Target = T;

                fn deref(&self) -> &T {
                    match self {
                        Self::Real(g) => g,
                        Self::Model(g) => g,
                    }
                }
            }

            $(
                impl<T> $mut for $name<'_, T> {
                    fn deref_mut(&mut self) -> &mut T {
                        match self {
                            Self::Real(g) => g,
                            Self::Model(g) => g,
                        }
                    }
                }
            )?
        };
    }

    guard!(MutexGuard, MutexGuard, MutexGuard, DerefMut);
    guard!(RwLockReadGuard, RwLockReadGuard, RwLockReadGuard,);
    guard!(RwLockWriteGuard, RwLockWriteGuard, RwLockWriteGuard, DerefMut);

    pub(crate) enum Mutex<T> {
        Real(parking_lot::Mutex<T>),
        Model(shuttle::sync::Mutex<T>),
    }

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            if in_model() {
                Self::Model(shuttle::sync::Mutex::new(value))
            } else {
                Self::Real(parking_lot::Mutex::new(value))
            }
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            match self {
                Self::Real(m) => MutexGuard::Real(m.lock()),
                // A panic under the lock fails the execution anyway; no need to re-panic.
                Self::Model(m) => MutexGuard::Model(m.lock().unwrap_or_else(PoisonError::into_inner)),
            }
        }
    }

    pub(crate) enum RwLock<T> {
        Real(parking_lot::RwLock<T>),
        Model(shuttle::sync::RwLock<T>),
    }

    impl<T> RwLock<T> {
        pub(crate) fn new(value: T) -> Self {
            if in_model() {
                Self::Model(shuttle::sync::RwLock::new(value))
            } else {
                Self::Real(parking_lot::RwLock::new(value))
            }
        }

        pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
            match self {
                Self::Real(l) => RwLockReadGuard::Real(l.read()),
                Self::Model(l) => RwLockReadGuard::Model(l.read().unwrap_or_else(PoisonError::into_inner)),
            }
        }

        pub(crate) fn write(&self) -> RwLockWriteGuard<'_, T> {
            match self {
                Self::Real(l) => RwLockWriteGuard::Real(l.write()),
                Self::Model(l) => RwLockWriteGuard::Model(l.write().unwrap_or_else(PoisonError::into_inner)),
            }
        }
    }

    pub(crate) enum AtomicU64 {
        Real(std::sync::atomic::AtomicU64),
        Model(shuttle::sync::atomic::AtomicU64),
    }

    impl AtomicU64 {
        pub(crate) fn new(value: u64) -> Self {
            if in_model() {
                Self::Model(shuttle::sync::atomic::AtomicU64::new(value))
            } else {
                Self::Real(std::sync::atomic::AtomicU64::new(value))
            }
        }

        pub(crate) fn load(&self, order: Ordering) -> u64 {
            match self {
                Self::Real(a) => a.load(order),
                Self::Model(a) => a.load(order),
            }
        }

        pub(crate) fn store(&self, value: u64, order: Ordering) {
            match self {
                Self::Real(a) => a.store(value, order),
                Self::Model(a) => a.store(value, order),
            }
        }

        pub(crate) fn fetch_add(&self, value: u64, order: Ordering) -> u64 {
            match self {
                Self::Real(a) => a.fetch_add(value, order),
                Self::Model(a) => a.fetch_add(value, order),
            }
        }

        pub(crate) fn fetch_max(&self, value: u64, order: Ordering) -> u64 {
            match self {
                Self::Real(a) => a.fetch_max(value, order),
                Self::Model(a) => a.fetch_max(value, order),
            }
        }
    }

    pub(crate) enum AtomicBool {
        Real(std::sync::atomic::AtomicBool),
        Model(shuttle::sync::atomic::AtomicBool),
    }

    impl AtomicBool {
        pub(crate) fn new(value: bool) -> Self {
            if in_model() {
                Self::Model(shuttle::sync::atomic::AtomicBool::new(value))
            } else {
                Self::Real(std::sync::atomic::AtomicBool::new(value))
            }
        }

        pub(crate) fn load(&self, order: Ordering) -> bool {
            match self {
                Self::Real(a) => a.load(order),
                Self::Model(a) => a.load(order),
            }
        }

        pub(crate) fn store(&self, value: bool, order: Ordering) {
            match self {
                Self::Real(a) => a.store(value, order),
                Self::Model(a) => a.store(value, order),
            }
        }
    }
}
