//! cargo fuzz target `mmio_transport`: see `tests/fuzz/src` (airlock_fuzz::TARGETS).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    airlock_fuzz::run("mmio_transport", data);
});
