//! The configuration of `airlock-netfilter --config FILE`, written by the
//! runtime for one sandbox, and the policy file it names (re-read on SIGHUP).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}; the runtime writes it before starting airlock-netfilter")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid {what} file; fix or rewrite it")]
    Parse {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}: upstream_dns is empty; name at least one DNS server")]
    NoUpstream(PathBuf),
}

/// One sandbox's filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// The sandbox's network namespace (a bind-mounted nsfs file) in which
    /// the listening sockets are created.
    pub netns: PathBuf,
    /// The address the guest knows as its gateway and DNS server.
    pub listen: Ipv4Addr,
    pub dns_port: u16,
    pub proxy_port: u16,
    /// The DNS servers queries are forwarded to, tried in turn.
    pub upstream_dns: Vec<SocketAddr>,
    /// The JSON [`Policy`], re-read on SIGHUP.
    pub policy_file: PathBuf,
    /// The host's own addresses, denied unless allowed by an address rule.
    pub host_addrs: Vec<IpAddr>,
}

impl FilterConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: FilterConfig = read_json(path, "airlock-netfilter configuration")?;
        if config.upstream_dns.is_empty() {
            return Err(ConfigError::NoUpstream(path.to_path_buf()));
        }
        Ok(config)
    }
}

/// Reads the policy file.
pub fn load_policy(path: &Path) -> Result<Policy, ConfigError> {
    read_json(path, "egress policy")
}

fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &'static str,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        what,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"netns": "/run/airlock/x/netns", "listen": "100.96.0.1",
        "dns_port": 53, "proxy_port": 3128, "upstream_dns": ["192.0.2.53:53"],
        "policy_file": "/run/airlock/x/policy.json", "host_addrs": ["203.0.113.5", "2001:db8::5"]}"#;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn loads() {
        let dir = tempfile::tempdir().unwrap();
        let c = FilterConfig::load(&write(&dir, "c.json", CONFIG)).unwrap();
        assert_eq!(c.listen, Ipv4Addr::new(100, 96, 0, 1));
        assert_eq!(c.proxy_port, 3128);
        assert_eq!(c.upstream_dns, ["192.0.2.53:53".parse().unwrap()]);
        assert_eq!(c.host_addrs.len(), 2);
    }

    #[test]
    fn refuses_unknown_fields_and_no_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let extra = CONFIG.replace("\"dns_port\"", "\"extra\": 1, \"dns_port\"");
        let e = FilterConfig::load(&write(&dir, "a.json", &extra)).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        let none = CONFIG.replace("[\"192.0.2.53:53\"]", "[]");
        let e = FilterConfig::load(&write(&dir, "b.json", &none)).unwrap_err();
        assert!(matches!(e, ConfigError::NoUpstream(_)), "{e}");
        let e = FilterConfig::load(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }

    #[test]
    fn policy_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = load_policy(&write(
            &dir,
            "p.json",
            r#"{"allow": ["a.test"], "deny": ["0.0.0.0/0"]}"#,
        ))
        .unwrap();
        assert!(p.allows_name("a.test") && p.denies_all_v4());
        let e = load_policy(&write(&dir, "q.json", r#"{"allow": ["ex ample"]}"#)).unwrap_err();
        assert!(
            airlock_report::chain(&e).contains("not a CIDR, IP address or domain name"),
            "{e}"
        );
    }
}
