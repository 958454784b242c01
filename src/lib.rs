//! MobiFace face-verification service.
pub mod api;
pub mod auth;
pub mod config;
pub mod detection;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fuzzing;
pub mod gallery;
pub mod imaging;
pub mod metrics;
pub mod startup;
pub mod telemetry;
