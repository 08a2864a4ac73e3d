#![no_main]
// The body lives in the library, where the replay test runs it on the committed inputs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_plugin::fuzzing::hpack(data));
