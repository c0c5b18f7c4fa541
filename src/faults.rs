//! Fault injection for tests of supervision and shutdown: a hidden
//! `serve --faults` flag (env `SOFTPROMPT_FAULTS`), empty by default, that
//! makes the inference thread or the store poller die, or batches slow, at
//! will. Tests run the real binary, which cannot be built with a test-only
//! feature from `cargo test`, so the hooks ship, off, in every build; each
//! costs one branch on a cold path.

use std::str::FromStr;
use std::time::Duration;

/// Faults to inject (all off by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// The inference thread panics, outside the per-batch guard, before
    /// the batch after this many batches.
    pub worker_panic_after: Option<u64>,
    /// The store poller panics after its first round.
    pub poller_panic: bool,
    /// Every batch takes at least this long (a saturated engine).
    pub batch_delay: Option<Duration>,
    /// Every forward pass fails (as an engine error would).
    pub batch_fail: bool,
}

impl FromStr for Faults {
    type Err = String;

    /// Comma-separated: `worker-panic-after=N`, `poller-panic`,
    /// `batch-delay-ms=N`, `batch-fail`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut f = Faults::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("fault {key:?} needs a number, got {value:?}"))
            };
            match key {
                "worker-panic-after" => f.worker_panic_after = Some(number()?),
                "poller-panic" => f.poller_panic = true,
                "batch-fail" => f.batch_fail = true,
                "batch-delay-ms" => f.batch_delay = Some(Duration::from_millis(number()?)),
                _ => return Err(format!("unknown fault {key:?}")),
            }
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_faults() {
        assert_eq!("".parse::<Faults>().unwrap(), Faults::default());
        let f: Faults = "worker-panic-after=3, poller-panic,batch-delay-ms=20"
            .parse()
            .unwrap();
        assert_eq!(f.worker_panic_after, Some(3));
        assert!(f.poller_panic);
        assert_eq!(f.batch_delay, Some(Duration::from_millis(20)));
        assert!("explode".parse::<Faults>().is_err());
        assert!("batch-delay-ms=x".parse::<Faults>().is_err());
    }
}
