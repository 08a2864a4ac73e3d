//! Delivery of secrets into the pod: memory-only file systems, the atomic file set, and
//! value conversions.

pub mod convert;
pub mod tmpfs;
pub mod writer;
