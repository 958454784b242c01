//! See `mobiface::fuzzing::multipart_body`; `cargo test` replays this target's corpus on stable.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mobiface::fuzzing::multipart_body(data));
