//! See `mobiface::fuzzing::decode_and_crop`; `cargo test` replays this target's corpus on stable.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mobiface::fuzzing::decode_and_crop(data));
