//! Readiness and graceful shutdown: whether the server drains, how many
//! requests are in flight, and the gate every request passes.
//!
//! On SIGTERM/SIGINT the server starts draining: `/ready` answers 503 at
//! once, new requests get 503 (the listener stays open so clients get an
//! answer, not a refused connection), in-flight requests finish, and the
//! listener closes when none is left or the shutdown bound passes. At the
//! bound, requests still waiting for the engine are answered 503
//! `shutting_down` ([`Lifecycle::expired`]), so the process exits within
//! the bound plus a short close grace, whatever the load.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use super::error::ApiError;
use super::state::AppState;

/// Draining flag and in-flight count, observable by waiters.
pub struct Lifecycle {
    draining: watch::Sender<bool>,
    /// Set when the shutdown bound passed with requests still in flight.
    expired: watch::Sender<bool>,
    in_flight: watch::Sender<usize>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            draining: watch::Sender::new(false),
            expired: watch::Sender::new(false),
            in_flight: watch::Sender::new(0),
        }
    }
}

impl Lifecycle {
    /// Starts draining (idempotent).
    pub fn begin_drain(&self) {
        self.draining
            .send_if_modified(|d| !std::mem::replace(d, true));
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves once draining starts.
    pub async fn draining(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Resolves once the shutdown bound has passed: waiting requests give
    /// up and answer 503 `shutting_down`.
    pub async fn expired(&self) {
        let mut rx = self.expired.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    /// Counts a request in until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.send_modify(|n| *n += 1);
        InFlight(self.clone())
    }

    /// Resolves once draining started and no request is in flight, or
    /// `bound` after draining started, whichever is first: the signal that
    /// closes the listener.
    pub async fn drained(self: Arc<Self>, bound: Duration) {
        self.draining().await;
        let mut rx = self.in_flight.subscribe();
        if tokio::time::timeout(bound, rx.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.in_flight(),
                "shutdown bound reached with requests in flight; answering them 503"
            );
            self.expired.send_replace(true);
            // The waiting handlers answer at once; give them a moment to
            // hand their answers to their connections.
            let _ = tokio::time::timeout(EXPIRED_ANSWER_GRACE, rx.wait_for(|n| *n == 0)).await;
        }
    }
}

/// How long requests get to answer once the bound expired them.
const EXPIRED_ANSWER_GRACE: Duration = Duration::from_millis(100);

/// One request in flight.
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n -= 1);
    }
}

/// Routes that keep answering while draining (probes and scraping).
fn always_open(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

/// Middleware: refuses new work while draining, counts the rest in flight.
pub async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.lifecycle.is_draining() && !always_open(req.uri().path()) {
        return ApiError::ShuttingDown.into_response();
    }
    let _in_flight = state.lifecycle.enter();
    next.run(req).await
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: draining"),
        _ = term => tracing::info!("SIGTERM: draining"),
    }
}
