//! Placeholder.
#![allow(clippy::unwrap_used)]
mod common;
