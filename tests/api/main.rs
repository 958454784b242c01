//! HTTP-level tests against the real application (one test binary, one helper).
mod detect;
mod embed;
mod gallery;
mod hardening;
mod helpers;
mod ops;
mod replicas;
mod trained;
