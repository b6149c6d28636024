//! `airlock-netfilter` as the runtime starts it: `--help`, and the one line
//! on stderr and exit status 1 for every error before `ready`.

use std::process::Command;

fn netfilter(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_airlock-netfilter"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help() {
    let out = netfilter(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config <FILE>"));
}

/// The process failed before `ready` with one line that contains `needle`.
fn fails_before_ready(config: &std::path::Path, needle: &str) {
    let out = netfilter(&["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "ready printed");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("airlock-netfilter: "), "{err}");
    assert!(last.contains(needle), "{err}");
}

#[test]
fn errors_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    fails_before_ready(&dir.path().join("missing.json"), "missing.json");

    let policy = dir.path().join("policy.json");
    let config = |netns: &str| {
        format!(
            r#"{{"netns": "{netns}", "listen": "127.0.0.1", "dns_port": 0, "proxy_port": 0,
                "upstream_dns": ["127.0.0.1:53"], "policy_file": "{}", "host_addrs": []}}"#,
            policy.display()
        )
    };
    let file = dir.path().join("filter.json");

    std::fs::write(&file, config("/nonexistent/netns")).unwrap();
    fails_before_ready(&file, "policy.json"); // no policy file yet

    std::fs::write(&policy, r#"{"allow": ["300.1.1.1/33"]}"#).unwrap();
    fails_before_ready(&file, "not a CIDR, IP address or domain name");

    std::fs::write(&policy, r#"{"allow": ["api.example.test"]}"#).unwrap();
    fails_before_ready(&file, "/nonexistent/netns");
}
