//! Request-level deadlines: the whole body must arrive within
//! `--body-timeout-ms` of the header, and a classify request must be
//! answered within `--request-timeout-ms` of its header, body read, queue
//! and compute included.

use std::error::Error;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use tokio::time::Sleep;

use super::error::ApiError;
use super::state::AppState;

/// The body did not arrive within its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0} ms")]
pub struct BodyDeadline(pub u64);

/// True when `e` or one of its sources is a [`BodyDeadline`]: how a
/// handler tells a slow client from a broken body after axum wrapped it.
pub fn body_deadline(e: &(dyn Error + 'static)) -> Option<u64> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(d) = err.downcast_ref::<BodyDeadline>() {
            return Some(d.0);
        }
        cur = err.source();
    }
    None
}

/// A body that fails once its deadline passes. Written here because
/// tower-http's `TimeoutBody` restarts its timer at every frame, so a
/// client sending a byte a second would never be cut off.
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<Sleep>>,
    limit_ms: u64,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Some(Err(axum::Error::new(BodyDeadline(self.limit_ms)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: the body must be complete within `--body-timeout-ms`.
pub async fn body_deadline_layer(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let limit = state.args.body_timeout();
    let (parts, body) = req.into_parts();
    let body = Body::new(DeadlineBody {
        inner: body,
        sleep: Box::pin(tokio::time::sleep(limit)),
        limit_ms: limit.as_millis() as u64,
    });
    next.run(Request::from_parts(parts, body)).await
}

/// Middleware of classify: the answer must be ready within
/// `--request-timeout-ms` of the header; otherwise 503 `timeout`, and the
/// request's rows are abandoned (the worker skips them). Not tower-http's
/// `TimeoutLayer`: it answers an empty 408, and the API promises the JSON
/// 503 `timeout` that clients and the balancer's retries key on.
pub async fn request_deadline(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let limit: Duration = state.args.request_timeout();
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(limit.as_millis() as u64).into_response(),
    }
}
