//! HTTP-level tests against the real application (one test binary, one helper).
mod embed;
mod helpers;
mod ops;
