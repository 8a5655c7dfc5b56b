//! Per-API-key request rate limiting (GCRA, via `governor`).
//!
//! Keys are identified by what the store already keeps for them (the key's id, or the
//! sha256 of the key): the limiter lives for the process's lifetime and must not become a
//! second place that holds plaintext keys.
//!
//! Check *after* authentication, so that only real keys get an entry: checking unknown keys
//! would let a client grow the table with random strings. Idle entries are still dropped
//! every [`RETAIN_EVERY`] checks, since revoked keys would otherwise stay forever.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};

/// How many checks pass between sweeps of idle keys. A sweep walks every entry, so it is
/// amortised over many requests rather than run on each.
pub const RETAIN_EVERY: u64 = 1024;

/// Requests per second per key, replenished continuously, with a burst allowance.
#[derive(Debug)]
pub struct RateLimiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    checks: AtomicU64,
}

/// A request refused by the rate limit: 429 `rate_limited` with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// How long until the key may send again.
    pub retry_after: Duration,
}

impl RateLimited {
    /// Whole seconds, rounded up and at least 1: `Retry-After` has no fractions, and 0 would
    /// invite an immediate retry that is refused again.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        secs.max(1)
    }
}

impl IntoResponse for RateLimited {
    fn into_response(self) -> Response {
        crate::ApiError::from(self).into_response()
    }
}

impl RateLimiter {
    /// `per_second` requests a second per key, up to `burst` at once. A zero for either is
    /// taken as 1: a limiter that refuses everything is never what was meant (use
    /// [`RateLimiter::disabled`] for no limit).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self {
            limiter: Some(DefaultKeyedRateLimiter::keyed(quota)),
            checks: AtomicU64::new(0),
        }
    }

    /// A limiter that allows everything.
    pub fn disabled() -> Self {
        Self {
            limiter: None,
            checks: AtomicU64::new(0),
        }
    }

    /// Counts one request of `key_id` (a key's id or hash, never the key itself).
    pub fn check(&self, key_id: &str) -> Result<(), RateLimited> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter
            .check_key(&key_id.to_owned())
            .map_err(|not_until| RateLimited {
                retry_after: not_until.wait_time_from(limiter.clock().now()),
            })
    }

    /// Keys currently tracked (an estimate under concurrency).
    pub fn tracked_keys(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;
    use axum::http::{header, StatusCode};

    #[test]
    fn a_burst_then_429_and_other_keys_unaffected() {
        let rl = RateLimiter::new(1, 3);
        for _ in 0..3 {
            rl.check("key-a").unwrap();
        }
        let refused = rl.check("key-a").unwrap_err();
        assert!(refused.retry_after > Duration::ZERO);
        assert!(refused.retry_after <= Duration::from_secs(1));
        assert_eq!(refused.retry_after_secs(), 1);
        // Another key has its own budget.
        for _ in 0..3 {
            rl.check("key-b").unwrap();
        }
        assert!(rl.check("key-b").is_err());
        assert_eq!(rl.tracked_keys(), 2);
    }

    #[test]
    fn disabled_allows_everything() {
        let rl = RateLimiter::disabled();
        for _ in 0..10_000 {
            rl.check("k").unwrap();
        }
        assert_eq!(rl.tracked_keys(), 0);
    }

    #[test]
    fn zero_settings_still_allow_one() {
        let rl = RateLimiter::new(0, 0);
        rl.check("k").unwrap();
        assert!(rl.check("k").is_err());
    }

    #[test]
    fn idle_keys_are_dropped() {
        let rl = RateLimiter::new(1_000_000, 1);
        rl.check("idle").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        for _ in 0..RETAIN_EVERY {
            let _ = rl.check("busy");
        }
        assert_eq!(rl.tracked_keys(), 1, "only the busy key is left");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = |ms| RateLimited {
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(r(0).retry_after_secs(), 1);
        assert_eq!(r(1).retry_after_secs(), 1);
        assert_eq!(r(1000).retry_after_secs(), 1);
        assert_eq!(r(1001).retry_after_secs(), 2);
        assert_eq!(r(59_500).retry_after_secs(), 60);
    }

    #[tokio::test]
    async fn response_is_429_with_retry_after_and_the_api_error_body() {
        let resp = RateLimited {
            retry_after: Duration::from_millis(2500),
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["code"], "rate_limited");
        assert!(v["error"]["message"].as_str().unwrap().contains("3s"));
    }
}
