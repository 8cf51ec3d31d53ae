//! strata (work in progress)
pub mod backplane;
pub mod breaker;
pub mod clock;
pub mod codec;
pub mod error;
pub mod key;
pub mod tier;
