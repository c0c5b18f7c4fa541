//! Process-wide tracing setup: human-readable by default, JSON on request,
//! level from `RUST_LOG` (default `info`, `warn` for object_store).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls are no-ops.
pub fn init(json: bool) {
    // object_store logs every retry of a request at info: during a store
    // outage that is several lines per poll, while the store poller already
    // reports the outage once (src/server/sync.rs).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,object_store=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
