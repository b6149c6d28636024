//! cargo fuzz target `egress_first_bytes`: see `tests/fuzz/src` (airlock_fuzz::TARGETS).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    airlock_fuzz::run("egress_first_bytes", data);
});
