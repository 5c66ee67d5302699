//! sluice: a rate-limiting reverse proxy for ML scoring APIs.
#![forbid(unsafe_code)]

pub mod config;
