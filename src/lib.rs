//! sluice: a rate-limiting reverse proxy for ML scoring APIs.
#![forbid(unsafe_code)]

pub mod app;
pub mod balance;
pub mod config;
pub mod demo;
pub mod policy;
pub mod proxy;
pub mod telemetry;

pub use app::App;
pub mod limit;
