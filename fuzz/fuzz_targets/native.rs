//! Arbitrary bytes into the native task-file reader: it must return Ok or
//! Err, never panic, and whatever it accepts must survive a write/read cycle
//! unchanged (same version).
#![no_main]

use libfuzzer_sys::fuzz_target;
use softprompt::task::native;

fuzz_target!(|data: &[u8]| {
    if let Ok(task) = native::from_bytes(data) {
        // A task the reader accepts but the writer refuses would be stuck in
        // the store: a metadata/model disagreement the reader let through.
        let bytes = native::to_bytes(&task).expect("an accepted task can be written");
        let back = native::from_bytes(&bytes).expect("a written task can be read");
        assert_eq!(back.version, task.version);
    }
});
