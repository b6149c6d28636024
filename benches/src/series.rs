//! What the teardown benchmark (a VM's exit with its wipe) and the wipe
//! benchmark (the wipe alone, without KVM) share: their arguments, their
//! two series of touched memory, and how a figure grows with guest memory.

use serde_json::Value;

#[derive(clap::Args, Clone)]
pub struct TeardownArgs {
    /// Runs per VMM and point
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
    /// Guest memory sizes in MiB (repeatable)
    #[arg(long = "memory", default_values_t = [128, 512, 2048])]
    pub memory: Vec<u64>,
    /// MiB the guest touches in the fixed-touch series
    #[arg(long, default_value_t = 32)]
    pub fixed_mib: u64,
}

/// The two series: half of guest memory touched, and a fixed amount.
pub const SERIES: [&str; 2] = ["half", "fixed"];

/// MiB a guest of `mem` MiB touches in `series` (the fixed amount is
/// `fixed_mib`, at most half of memory).
pub fn touched_mib(series: &str, mem: u64, fixed_mib: u64) -> u64 {
    if series == "half" {
        mem / 2
    } else {
        fixed_mib.min(mem / 2)
    }
}

/// The median at the largest guest of `memory` over the one at the
/// smallest, among `results` of `series`; `median` gives a result's median
/// in ms, or `None` for a result that does not count. NaN when one is
/// missing.
pub fn growth(
    results: &[Value],
    series: &str,
    memory: &[u64],
    median: impl Fn(&Value) -> Option<f64>,
) -> f64 {
    let pick = |mem: Option<&u64>| {
        let mem = mem?;
        results
            .iter()
            .filter(|r| r["series"] == series && r["guest_mib"] == *mem)
            .find_map(&median)
    };
    match (pick(memory.iter().max()), pick(memory.iter().min())) {
        (Some(hi), Some(lo)) => hi / lo,
        _ => f64::NAN,
    }
}
