//! What a benchmark reports: a markdown table for people and a JSON value
//! for scripts, and the machine it ran on.

use serde::Serialize;
use serde_json::Value;

/// One benchmark's results.
pub struct Section {
    pub markdown: String,
    pub json: Value,
}

impl Section {
    pub fn new(json: Value) -> Self {
        Section {
            markdown: String::new(),
            json,
        }
    }

    /// Appends a paragraph.
    pub fn para(&mut self, text: &str) {
        self.markdown.push_str(text);
        self.markdown.push_str("\n\n");
    }

    /// Appends a markdown table; the first column is left-aligned, the rest
    /// right-aligned.
    pub fn table(&mut self, headers: &[&str], rows: &[Vec<String>]) {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let heads: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
        self.markdown.push_str(&line(&heads));
        let align: Vec<String> = (0..headers.len())
            .map(|i| if i == 0 { "---".into() } else { "---:".into() })
            .collect();
        self.markdown.push_str(&line(&align));
        for r in rows {
            self.markdown.push_str(&line(r));
        }
        self.markdown.push('\n');
    }
}

/// `value ÷ best`, where the best is the lowest of `values` (times) or,
/// with `higher_is_better`, the highest (rates).
pub fn ratio_to_best(value: f64, values: &[f64], higher_is_better: bool) -> f64 {
    let finite = values.iter().copied().filter(|v| v.is_finite() && *v > 0.0);
    let best = if higher_is_better {
        finite.fold(f64::NAN, f64::max)
    } else {
        finite.fold(f64::NAN, f64::min)
    };
    value / best
}

/// The machine the benchmarks ran on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_mib: u64,
    pub kernel: String,
    /// Inside the test host (QEMU TCG `-cpu max`, nested KVM), not on
    /// hardware virtualisation.
    pub test_host: bool,
}

impl Machine {
    pub fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mib,
            kernel,
            test_host: std::env::var_os("AIRLOCK_TESTHOST").is_some(),
        }
    }

    pub fn describe(&self) -> String {
        self.describe_at(if self.test_host {
            "inside the test host (QEMU TCG `-cpu max`, nested KVM; absolute times are slowed many times over, ratios are what count)"
        } else {
            "on hardware virtualisation"
        })
    }

    /// For benchmarks that run no VM.
    pub fn describe_without_vm(&self) -> String {
        self.describe_at(if self.test_host {
            "inside the test host (QEMU TCG `-cpu max`), no VM of its own"
        } else {
            "directly on this machine, no VM"
        })
    }

    fn describe_at(&self, place: &str) -> String {
        format!(
            "{} CPUs ({}), {} MiB, Linux {}, {place}",
            self.cpus, self.cpu, self.memory_mib, self.kernel
        )
    }
}

/// Milliseconds with no decimals, or "–" when missing.
pub fn ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "–".into()
    }
}

/// A ratio as `0.42×`.
pub fn times(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}×")
    } else {
        "–".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_to_the_best_of_times_and_of_rates() {
        assert_eq!(ratio_to_best(2.0, &[2.0, 4.0, f64::NAN], false), 1.0);
        assert_eq!(ratio_to_best(4.0, &[2.0, 4.0], false), 2.0);
        assert_eq!(ratio_to_best(2.0, &[2.0, 4.0], true), 0.5);
    }

    #[test]
    fn tables_are_markdown() {
        let mut s = Section::new(Value::Null);
        s.table(&["a", "b"], &[vec!["x".into(), "1".into()]]);
        assert_eq!(s.markdown, "| a | b |\n| --- | ---: |\n| x | 1 |\n\n");
    }
}
