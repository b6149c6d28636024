//! The network of a task's or pod's VM, from its OCI spec: a pod whose
//! sandbox spec names a network namespace (the CRI plugin's, after CNI)
//! gets its NIC joined to it; otherwise the runtime config's `[network]`
//! mode applies, which `ctr run` tasks (and pods) may change through
//! annotations.

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::net::{NetError, NetOptions};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// `none` or `egress`, over the config's `[network] mode`.
pub const NET_ANNOTATION: &str = "io.airlock.net";
/// Comma-separated `--allow-out` entries.
pub const ALLOW_OUT_ANNOTATION: &str = "io.airlock.allow-out";
/// Comma-separated `--deny-out` entries.
pub const DENY_OUT_ANNOTATION: &str = "io.airlock.deny-out";

/// The network `spec` asks for.
pub fn options(spec: &Spec, config: &RuntimeConfig) -> Result<NetOptions, NetError> {
    let empty = Default::default();
    let a = spec.annotations().as_ref().unwrap_or(&empty);
    let list = |key: &str| -> Vec<String> {
        a.get(key)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut opts = NetOptions::from_flags(
        &config.network,
        a.get(NET_ANNOTATION).map(String::as_str),
        &list(ALLOW_OUT_ANNOTATION),
        &list(DENY_OUT_ANNOTATION),
    )?;
    opts.pod_netns = pod_netns(spec);
    Ok(opts)
}

/// The network namespace the spec joins, if it names one by path.
fn pod_netns(spec: &Spec) -> Option<std::path::PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_runtime::net::NetMode;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(&format!(r#"{{"ociVersion":"1.0.2"{json}}}"#)).unwrap()
    }

    #[test]
    fn a_cni_namespace_is_the_pods_nic() {
        let s = spec(
            r#","linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"}]}"#,
        );
        let o = options(&s, &RuntimeConfig::default()).unwrap();
        assert_eq!(
            o.pod_netns.as_deref(),
            Some(std::path::Path::new("/var/run/netns/cni-1"))
        );
        assert_eq!(o.mode, NetMode::None);
        let s = spec(r#","linux":{"namespaces":[{"type":"network"}]}"#);
        assert_eq!(
            options(&s, &RuntimeConfig::default()).unwrap().pod_netns,
            None
        );
    }

    #[test]
    fn annotations_choose_the_mode_and_policy() {
        let s = spec(
            r#","annotations":{"io.airlock.net":"egress","io.airlock.deny-out":"0.0.0.0/0","io.airlock.allow-out":"api.example.test, 192.0.2.0/24"}"#,
        );
        let o = options(&s, &RuntimeConfig::default()).unwrap();
        assert_eq!(o.mode, NetMode::Egress);
        assert_eq!((o.policy.allow.len(), o.policy.deny.len()), (2, 1));
        let s = spec(r#","annotations":{"io.airlock.net":"bogus"}"#);
        let e = options(&s, &RuntimeConfig::default()).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
