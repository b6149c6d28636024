//! Order statistics for a set of timings.

use serde::Serialize;

/// Median and spread of samples, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// Summarises `samples`; `None` when there are none.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Summary {
        runs: n,
        median_ms: median,
        min_ms: s[0],
        max_ms: s[n - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_sets() {
        assert_eq!(summarize(&[3.0, 1.0, 2.0]).unwrap().median_ms, 2.0);
        let s = summarize(&[4.0, 1.0, 3.0, 2.0, f64::NAN]).unwrap();
        assert_eq!(
            (s.runs, s.median_ms, s.min_ms, s.max_ms),
            (4, 2.5, 1.0, 4.0)
        );
        assert!(summarize(&[]).is_none());
    }
}
