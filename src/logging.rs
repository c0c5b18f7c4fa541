//! Process-wide tracing setup and rate-limited warnings.
//!
//! Text by default, JSON lines on request (`--log-format json`); level from
//! `RUST_LOG` (default `info`, `warn` for object_store). Colour codes only
//! when stderr is a terminal: a log file or a container's log driver gets
//! plain text.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal only).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber once; later calls are no-ops.
pub fn init(format: LogFormat) {
    // object_store logs every retry of a request at info: during a store
    // outage that is several lines per poll, while the store poller already
    // reports the outage once (src/server/sync.rs).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,object_store=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Lets one event through per interval and counts the ones it holds back,
/// so a flood of identical warnings (a 503 per request during a drain, a
/// failed login per guess, an accept error per connection) costs one line
/// per interval instead of one per event. Written here because tracing has
/// no built-in rate limiting and the crates that add it are unmaintained.
pub struct RateLimit {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    /// At most one event per `interval`.
    pub const fn new(interval: Duration) -> Self {
        RateLimit {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed)` when this event should be logged, with how many
    /// were held back since the last one logged; `None` to skip it.
    pub fn check(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                s.1 += 1;
                None
            }
            _ => {
                s.0 = Some(now);
                Some(std::mem::take(&mut s.1))
            }
        }
    }
}

/// The interval of the process's rate-limited warnings.
pub const WARN_INTERVAL: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_interval_and_the_rest_are_counted() {
        let limit = RateLimit::new(Duration::from_millis(200));
        assert_eq!(limit.check(), Some(0));
        for _ in 0..10 {
            assert_eq!(limit.check(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limit.check(), Some(10));
        assert_eq!(limit.check(), None);
    }
}
