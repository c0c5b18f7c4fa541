//! Prometheus exposition: the recorder, metric names, the per-request HTTP
//! middleware, and the bound on per-task label cardinality.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::batch::metrics as batch;

/// Counter: HTTP requests by route template, method and status.
pub const HTTP_REQUESTS: &str = "softprompt_http_requests_total";
/// Histogram: HTTP request latency in seconds, by route template.
pub const HTTP_SECONDS: &str = "softprompt_http_request_duration_seconds";
/// Counter: classify requests by outcome (`ok` or the error type).
pub const CLASSIFY_REQUESTS: &str = "softprompt_classify_requests_total";
/// Counter: classify requests by task (bounded, see [`TaskLabels`]) and outcome.
pub const TASK_REQUESTS: &str = "softprompt_task_requests_total";
/// Counter: inputs classified by task (bounded).
pub const TASK_INPUTS: &str = "softprompt_task_inputs_total";
/// Gauge: tasks served.
pub const TASKS: &str = "softprompt_tasks";
/// Gauge: open client connections.
pub const CONNECTIONS_OPEN: &str = "softprompt_connections_open";
/// Counter: times the connection bound was reached.
pub const CONNECTIONS_LIMITED: &str = "softprompt_connections_limited_total";
/// Counter: connections closed by the server, by reason (`idle`,
/// `header_timeout`, `shed`).
pub const CONNECTIONS_CLOSED: &str = "softprompt_connections_closed_total";
/// Gauge: 1 while a supervised component (`inference`, `store_poller`)
/// runs, 0 once it died.
pub const COMPONENT_UP: &str = "softprompt_component_up";
/// Counter: admin requests refused for a missing or wrong token.
pub const AUTH_FAILURES: &str = "softprompt_admin_auth_failures_total";

/// The process-wide Prometheus recorder. The `metrics` facade has one
/// global recorder, so every server in a process (tests start several)
/// shares it; it is installed on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ];
            let powers = |max: u32| (0..=max).map(|p| f64::from(1u32 << p)).collect::<Vec<_>>();
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(batch::BATCH_ROWS.into()), &powers(10))
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(batch::BATCH_TASKS.into()), &powers(10))
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(batch::BATCH_TOKENS.into()), &powers(20))
                })
                .expect("bucket lists are non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Task ids as metric labels, bounded: the first `max` tasks that receive
/// traffic get their own label, later ones share `other`, so thousands of
/// tasks cannot explode the exposition. Only served tasks claim a slot
/// (requests for unknown ids are labelled `unknown`).
pub struct TaskLabels {
    max: usize,
    known: Mutex<HashSet<String>>,
}

/// Label of tasks past the bound.
pub const OTHER_TASKS: &str = "other";
/// Label of requests for a task that is not served.
pub const UNKNOWN_TASK: &str = "unknown";

impl TaskLabels {
    /// At most `max` distinct task labels.
    pub fn new(max: usize) -> Self {
        TaskLabels {
            max,
            known: Mutex::new(HashSet::new()),
        }
    }

    /// The label for served task `id`.
    pub fn label(&self, id: &str) -> String {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.contains(id) {
            return id.to_string();
        }
        if known.len() < self.max {
            known.insert(id.to_string());
            return id.to_string();
        }
        OTHER_TASKS.to_string()
    }
}

/// Middleware: counts and times every request by route template (never by
/// raw path, which would be unbounded).
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    tracing::debug!(%method, %route, status, ms = elapsed.as_secs_f64() * 1e3, "request");
    metrics::counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status.to_string())
        .increment(1);
    metrics::histogram!(HTTP_SECONDS, "route" => route).record(elapsed.as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_labels_are_bounded() {
        let l = TaskLabels::new(2);
        assert_eq!(l.label("a"), "a");
        assert_eq!(l.label("b"), "b");
        assert_eq!(l.label("c"), OTHER_TASKS);
        assert_eq!(l.label("a"), "a");
        assert_eq!(l.label("d"), OTHER_TASKS);
    }
}
