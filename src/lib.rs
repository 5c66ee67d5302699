//! sluice: a rate-limiting reverse proxy for ML scoring APIs.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod autoscale;
pub mod balance;
pub mod config;
pub mod control;
pub mod demo;
pub mod healthcheck;
pub mod limit;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reason;
pub mod recorders;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod upstream;

pub use app::App;
