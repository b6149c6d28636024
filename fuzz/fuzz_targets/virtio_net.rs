//! cargo fuzz target `virtio_net`: see `tests/fuzz/src` (airlock_fuzz::TARGETS).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    airlock_fuzz::run("virtio_net", data);
});
