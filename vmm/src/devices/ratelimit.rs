//! Rate-limited logging for what a guest can trigger at will.
//!
//! A hostile guest can make a device log a line per request (a malformed
//! chain, a ring placed outside its memory, a reset loop): thousands of
//! lines a second into the VMM's log on the host. Every such call site goes
//! through [`ratelimited!`], which gives each call site its own
//! [`RateLimiter`]: at most [`LINES_PER_PERIOD`] lines per [`PERIOD`], then
//! silence; the next line let through after a quiet period is preceded by
//! one "suppressed K similar messages" line, so nothing is lost silently.
//!
//! Written here rather than taken from a crate: nothing in `Cargo.lock`
//! does it, and the whole of it is a counter per call site behind a mutex
//! that is only taken when a line is about to be logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines each call site may log per [`PERIOD`].
pub const LINES_PER_PERIOD: u32 = 10;
/// The period of [`LINES_PER_PERIOD`].
pub const PERIOD: Duration = Duration::from_secs(1);

/// What a call site may do with the line it is about to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; first say that `suppressed` lines were dropped since the
    /// last one logged (when there were any).
    Log { suppressed: u64 },
    /// Drop it (it is counted).
    Drop,
}

#[derive(Debug)]
struct State {
    /// Start of the current period; `None` before the first line.
    period_start: Option<Instant>,
    /// Lines logged in the current period.
    lines: u32,
    /// Lines dropped since the last one logged.
    suppressed: u64,
}

/// One call site's limit: `lines` per `period`.
#[derive(Debug)]
pub struct RateLimiter {
    lines: u32,
    period: Duration,
    state: Mutex<State>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimiter {
    /// [`LINES_PER_PERIOD`] lines per [`PERIOD`] (usable in a `static`).
    pub const fn new() -> Self {
        Self::with_limit(LINES_PER_PERIOD, PERIOD)
    }

    /// `lines` lines per `period`.
    pub const fn with_limit(lines: u32, period: Duration) -> Self {
        RateLimiter {
            lines,
            period,
            state: Mutex::new(State {
                period_start: None,
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// Whether a line may be logged at `now` (time is passed in for tests).
    pub fn check_at(&self, now: Instant) -> Verdict {
        // A poisoned lock only means a thread panicked while counting.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = s
            .period_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.period);
        if expired {
            s.period_start = Some(now);
            s.lines = 0;
        }
        if s.lines < self.lines {
            s.lines += 1;
            let suppressed = std::mem::take(&mut s.suppressed);
            Verdict::Log { suppressed }
        } else {
            s.suppressed = s.suppressed.saturating_add(1);
            Verdict::Drop
        }
    }
}

/// Logs through `tracing` at `$level` (`error`, `warn`, `info`, `debug`),
/// at most [`LINES_PER_PERIOD`] lines per [`PERIOD`] from this call site;
/// takes what `tracing::$level!` takes.
macro_rules! ratelimited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMITER: $crate::devices::ratelimit::RateLimiter =
            $crate::devices::ratelimit::RateLimiter::new();
        if let $crate::devices::ratelimit::Verdict::Log { suppressed } = LIMITER.check() {
            if suppressed > 0 {
                ::tracing::$level!(suppressed, "suppressed {suppressed} similar messages");
            }
            ::tracing::$level!($($arg)+);
        }
    }};
}
pub(crate) use ratelimited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_the_limit_through_then_drops_and_counts() {
        let t0 = Instant::now();
        let rl = RateLimiter::with_limit(3, Duration::from_secs(1));
        for _ in 0..3 {
            assert_eq!(rl.check_at(t0), Verdict::Log { suppressed: 0 });
        }
        for i in 1..=5 {
            let at = t0 + Duration::from_millis(100 * i);
            assert_eq!(rl.check_at(at), Verdict::Drop);
        }
        // A new period: the first line carries the count, once.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(rl.check_at(t1), Verdict::Log { suppressed: 5 });
        assert_eq!(rl.check_at(t1), Verdict::Log { suppressed: 0 });
    }

    #[test]
    fn a_flood_logs_at_most_the_limit_per_period() {
        let t0 = Instant::now();
        let rl = RateLimiter::with_limit(10, Duration::from_secs(1));
        let (mut logged, mut reported) = (0u64, 0u64);
        // 100 000 lines over 10 s.
        for i in 0..100_000u64 {
            let at = t0 + Duration::from_micros(i * 100);
            if let Verdict::Log { suppressed } = rl.check_at(at) {
                logged += 1;
                reported += suppressed;
            }
        }
        assert_eq!(logged, 100);
        // Each drop is reported, but the last period's.
        assert_eq!(reported, 100_000 - 100 - (10_000 - 10));
        assert_eq!(
            rl.check_at(t0 + Duration::from_secs(11)),
            Verdict::Log {
                suppressed: 10_000 - 10
            }
        );
    }

    #[test]
    fn time_going_backwards_does_not_panic_or_reopen_the_period() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let rl = RateLimiter::with_limit(1, Duration::from_secs(1));
        assert_eq!(rl.check_at(t0), Verdict::Log { suppressed: 0 });
        assert_eq!(rl.check_at(t0 - Duration::from_secs(3)), Verdict::Drop);
    }

    #[test]
    fn the_macro_takes_what_tracing_takes() {
        // Levels, fields and format arguments, each site with its limiter.
        for _ in 0..100 {
            ratelimited!(debug, "flood");
        }
        ratelimited!(warn, n = 1, "another site");
        ratelimited!(error, "a third: {}", 3);
        ratelimited!(info, "a fourth");
    }
}
