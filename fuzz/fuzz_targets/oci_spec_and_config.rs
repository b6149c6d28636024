//! cargo fuzz target `oci_spec_and_config`: see `tests/fuzz/src` (airlock_fuzz::TARGETS).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    airlock_fuzz::run("oci_spec_and_config", data);
});
