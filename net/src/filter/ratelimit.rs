//! Rate limiting for the log lines a tenant can cause (each refused name or
//! connection): at most [`PER_SECOND`] a second per limiter, and the first
//! line after a quiet spell says how many were left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a limiter lets through per one-second window.
pub const PER_SECOND: u32 = 10;

/// One kind of log line's budget.
#[derive(Debug)]
pub struct RateLimit(Mutex<Window>);

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new() -> Self {
        RateLimit(Mutex::new(Window {
            start: None,
            lines: 0,
            suppressed: 0,
        }))
    }

    /// `Some(n)` if a line may be logged now, `n` being how many were left
    /// out since the last one; `None` if this one is to be left out.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let expired = w
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1));
        if expired {
            w.start = Some(now);
            w.lines = 0;
        }
        if w.lines >= PER_SECOND {
            w.suppressed = w.suppressed.saturating_add(1);
            return None;
        }
        w.lines += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_a_second_then_the_count_of_the_rest() {
        let limit = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..PER_SECOND {
            assert_eq!(limit.allow_at(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(limit.allow_at(t0 + Duration::from_millis(500)), None);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limit.allow_at(t1), Some(5));
        assert_eq!(limit.allow_at(t1), Some(0));
    }
}
