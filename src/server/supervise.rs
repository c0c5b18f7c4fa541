//! Supervision of the two long-lived workers, the inference thread and the
//! store poller. A server whose inference thread died answers nothing
//! useful, and one whose poller died silently serves stale tasks forever;
//! either way the right move is to say so and exit non-zero, so the
//! orchestrator restarts the process.
//!
//! On a death: `/ready` answers 503 `failed` with the reason at once,
//! `softprompt_component_up{component}` drops to 0, the error is logged,
//! and after [`FAIL_LINGER`] (for probes and scrapers to see it) the server
//! drains and [`super::Server::wait`] returns the reason as an error.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::metrics::COMPONENT_UP;
use super::state::AppState;

/// How long a failed server keeps answering probes before it drains.
pub const FAIL_LINGER: Duration = Duration::from_secs(1);

/// Names of the supervised components (metric label values).
pub const INFERENCE: &str = "inference";
pub const STORE_POLLER: &str = "store_poller";

/// Watches the inference thread and (when polling is on) the store poller.
pub fn start(state: Arc<AppState>, poller: Option<JoinHandle<()>>) {
    metrics::gauge!(COMPONENT_UP, "component" => INFERENCE).set(1.0);
    if poller.is_some() {
        metrics::gauge!(COMPONENT_UP, "component" => STORE_POLLER).set(1.0);
    }
    let st = state.clone();
    tokio::spawn(async move {
        let Some(core) = st.core.get() else { return };
        let reason = core.batcher.died().await;
        fail(&st, INFERENCE, reason).await;
    });
    if let Some(poller) = poller {
        tokio::spawn(async move {
            let outcome = poller.await;
            if state.lifecycle.is_draining() {
                return;
            }
            let reason = match outcome {
                Ok(()) => "the store poller stopped".to_string(),
                Err(e) if e.is_panic() => format!(
                    "the store poller panicked: {}",
                    crate::batch::panic_text(&*e.into_panic())
                ),
                Err(e) => format!("the store poller was cancelled: {e}"),
            };
            fail(&state, STORE_POLLER, reason).await;
        });
    }
}

async fn fail(state: &AppState, component: &'static str, reason: String) {
    metrics::gauge!(COMPONENT_UP, "component" => component).set(0.0);
    tracing::error!(component, reason = %reason, "a server component died; exiting after a drain so the orchestrator restarts the process");
    state.set_failure(reason);
    tokio::time::sleep(FAIL_LINGER).await;
    state.lifecycle.begin_drain();
}
