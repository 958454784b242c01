//! `mobiface eval`: LFW-protocol verification metrics through the service's
//! own preprocessing and inference engine.

pub mod metrics;
pub mod pairs;

pub mod roc;
