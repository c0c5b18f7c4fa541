//! Bearer-token guard of the admin routes. Without a configured token the
//! admin API is closed, never open.
//!
//! Failed attempts are counted (`softprompt_admin_auth_failures_total`),
//! logged at WARN (rate-limited), and slow a guessing client down: from the
//! [`FREE_FAILURES`]th failure on, the client (by peer address) is refused
//! 429 `auth_backoff` without its token being checked for a back-off that
//! doubles with each failure, up to [`MAX_BACKOFF`]. Behind a proxy the
//! peer is the proxy: reach the admin API directly, not through the
//! public load balancer, or a guesser there slows every admin down.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use dashmap::DashMap;

use super::error::ApiError;
use super::metrics::AUTH_FAILURES;
use super::state::AppState;
use crate::logging::{RateLimit, WARN_INTERVAL};

/// Failures a client may make before back-off starts.
pub const FREE_FAILURES: u32 = 4;
/// Longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A client's count is forgotten after this long without a failure.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Clients tracked at most (a flood of addresses must not grow memory
/// without bound); past it, stale entries go, then all.
const MAX_CLIENTS: usize = 100_000;

/// Failed attempts per client address.
#[derive(Default)]
pub struct Failures {
    by_client: DashMap<IpAddr, Failure>,
}

#[derive(Clone, Copy)]
struct Failure {
    count: u32,
    /// No attempt is checked before this.
    blocked_until: Instant,
    last: Instant,
}

impl Failures {
    /// Time left in `ip`'s back-off, if any.
    fn backoff_left(&self, ip: IpAddr) -> Option<Duration> {
        let f = *self.by_client.get(&ip)?;
        let left = f.blocked_until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Counts a failure of `ip`; returns its count.
    fn record(&self, ip: IpAddr) -> u32 {
        let now = Instant::now();
        if self.by_client.len() >= MAX_CLIENTS {
            self.by_client
                .retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if self.by_client.len() >= MAX_CLIENTS {
                self.by_client.clear();
            }
        }
        let mut entry = self.by_client.entry(ip).or_insert(Failure {
            count: 0,
            blocked_until: now,
            last: now,
        });
        let f = entry.value_mut();
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        f.blocked_until = now + backoff(f.count);
        f.count
    }

    fn clear(&self, ip: IpAddr) {
        self.by_client.remove(&ip);
    }
}

/// Back-off after `count` failures: none for the first few, then 1 s
/// doubling up to [`MAX_BACKOFF`].
pub fn backoff(count: u32) -> Duration {
    if count < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (count - FREE_FAILURES).min(16);
    Duration::from_secs(1u64 << doublings).min(MAX_BACKOFF)
}

/// Extractor that succeeds only for a request carrying
/// `Authorization: Bearer <admin token>`; handlers that take it are admin
/// routes. It runs before the body is read.
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = state.admin_token.as_deref() else {
            return Err(ApiError::AdminDisabled);
        };
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        if let Some(left) = state.auth_failures.backoff_left(ip) {
            metrics::counter!(AUTH_FAILURES, "reason" => "backoff").increment(1);
            return Err(ApiError::AuthBackoff {
                retry_after_s: left.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match presented {
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
                state.auth_failures.clear(ip);
                Ok(Admin)
            }
            _ => {
                let reason = if presented.is_some() {
                    "wrong_token"
                } else {
                    "missing_token"
                };
                metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(1);
                let count = state.auth_failures.record(ip);
                static LOG: RateLimit = RateLimit::new(WARN_INTERVAL);
                if let Some(suppressed) = LOG.check() {
                    tracing::warn!(client = %ip, reason, failures = count, backoff_s = backoff(count).as_secs(),
                        suppressed, "admin authentication failed");
                }
                Err(ApiError::Unauthorized)
            }
        }
    }
}

/// Compares without an early exit, so response timing does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_after_the_free_failures_and_doubles_to_the_cap() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(FREE_FAILURES - 1), Duration::ZERO);
        assert_eq!(backoff(FREE_FAILURES), Duration::from_secs(1));
        assert_eq!(backoff(FREE_FAILURES + 1), Duration::from_secs(2));
        assert_eq!(backoff(FREE_FAILURES + 40), MAX_BACKOFF);
        let f = Failures::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..FREE_FAILURES - 1 {
            f.record(ip);
            assert!(f.backoff_left(ip).is_none());
        }
        f.record(ip);
        assert!(f.backoff_left(ip).is_some());
        assert!(f.backoff_left("10.0.0.2".parse().unwrap()).is_none());
        f.clear(ip);
        assert!(f.backoff_left(ip).is_none());
    }

    #[test]
    fn equal_only_when_identical() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
