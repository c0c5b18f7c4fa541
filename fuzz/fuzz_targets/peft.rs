//! Arbitrary bytes into the PEFT adapter reader. The input is split in two
//! at its first 0xFF byte (never valid in UTF-8 JSON): the adapter config
//! before it, the safetensors weights after it. Must never panic; an
//! accepted adapter must also go through the native format unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use softprompt::task::{native, peft};

fuzz_target!(|data: &[u8]| {
    let (config, weights) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(task) = peft::from_bytes(config, weights, None) {
        let bytes = native::to_bytes(&task).expect("an accepted adapter can be stored");
        let back = native::from_bytes(&bytes).expect("a stored adapter can be read");
        assert_eq!(back.version, task.version);
        // Whatever PEFT can express must export and come back identical.
        if let Ok(files) = peft::to_files(&task) {
            let again = peft::from_bytes(&files.config_json, &files.weights, None)
                .expect("an export can be imported");
            assert_eq!(again.version, task.version);
        }
    }
});
