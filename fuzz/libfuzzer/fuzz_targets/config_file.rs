#![no_main]
libfuzzer_sys::fuzz_target!(init: konor_fuzz::unwinding_panics(), |data: &[u8]| konor_fuzz::config_file(data));
