//! sluice: a rate-limiting reverse proxy for ML scoring APIs.
#![forbid(unsafe_code)]

pub mod autoscale;
pub mod config;
