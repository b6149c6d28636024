//! The bundle's OCI spec, made fit for the guest. What containerd (or the
//! CRI plugin) wrote refers to the host: namespace paths (a CNI network
//! namespace), hooks to run on the host, bind mounts of host files. Inside
//! the microVM none of those exist; the agent adds the rest (root, cgroup,
//! the namespaces every container gets).

use std::collections::HashMap;
use std::path::Path;

use airlock_runtime::config::{ConfigError, RuntimeConfig};
use oci_spec::runtime::Spec;

/// A bundle whose spec cannot be used, or whose VM size is refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read the OCI spec {0}: {1}")]
    Read(String, #[source] std::io::Error),
    #[error("malformed OCI spec {0}: {1}")]
    Parse(String, String),
    #[error("annotation {key}={value:?} is not a whole number")]
    NotANumber { key: String, value: String },
    #[error("annotation {key}={asked}: {asked} {unit} is more than {limit}")]
    OverPodLimit {
        key: &'static str,
        asked: u64,
        unit: &'static str,
        limit: String,
    },
    #[error("{asker}: {source}")]
    Size {
        asker: String,
        #[source]
        source: ConfigError,
    },
}

/// Reads `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let name = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(|e| SpecError::Read(name.clone(), e))?;
    serde_json::from_slice(&bytes).map_err(|e| SpecError::Parse(name, e.to_string()))
}

/// What [`for_guest`] left out, for the shim's log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Destinations of host bind mounts.
    pub bind_mounts: Vec<String>,
    pub hooks: bool,
}

/// The spec to send to the agent: no namespace paths, no hooks, no bind
/// mounts of host paths.
pub fn for_guest(mut spec: Spec) -> (Spec, Dropped) {
    let mut dropped = Dropped::default();
    if spec.hooks().is_some() {
        spec.set_hooks(None);
        dropped.hooks = true;
    }
    if let Some(mounts) = spec.mounts().clone() {
        let (bind, kept): (Vec<_>, Vec<_>) = mounts.into_iter().partition(|m| {
            m.typ().as_deref() == Some("bind")
                || m.options()
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
        });
        dropped.bind_mounts = bind
            .iter()
            .map(|m| m.destination().display().to_string())
            .collect();
        spec.set_mounts(Some(kept));
    }
    if let Some(mut linux) = spec.linux().clone() {
        if let Some(mut ns) = linux.namespaces().clone() {
            for n in &mut ns {
                n.set_path(None);
            }
            linux.set_namespaces(Some(ns));
        }
        // The agent puts each container in its own cgroup.
        linux.set_cgroups_path(None);
        spec.set_linux(Some(linux));
    }
    (spec, dropped)
}

/// The pod a CRI container belongs to and whether it is the pod's sandbox
/// (pause) container, from the annotations the CRI plugin sets.
pub fn pod_of(spec: &Spec) -> Option<(String, bool)> {
    let a = spec.annotations().as_ref()?;
    let kind = a.get("io.kubernetes.cri.container-type")?;
    let id = a.get("io.kubernetes.cri.sandbox-id")?;
    Some((id.clone(), kind == "sandbox"))
}

/// Pod annotations (passed through by containerd's `pod_annotations`)
/// that size a pod's microVM.
pub const VCPUS_ANNOTATION: &str = "io.airlock.vcpus";
pub const MEMORY_ANNOTATION: &str = "io.airlock.memory-mib";
/// The pod's resources as containerd 1.7+ hands them to VM runtimes.
const CRI_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const CRI_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const CRI_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The VM's vCPUs and memory for the container that boots it: the Airlock
/// annotations if set; else the pod's limits from the CRI annotations (plus
/// the configured `memory_mib` as the guest's own overhead); else the
/// config's. An annotation may not ask for more than the pod's CRI limits
/// (when it has them), and nothing for more than the config's `[limits]`
/// ([`RuntimeConfig::check_vm_size`]): what does is refused, never shrunk.
pub fn vm_size(spec: &Spec, config: &RuntimeConfig) -> Result<(u8, u32), SpecError> {
    let empty = HashMap::new();
    let a = spec.annotations().as_ref().unwrap_or(&empty);
    let num = |key: &str| -> Result<Option<u64>, SpecError> {
        a.get(key)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| SpecError::NotANumber {
                    key: key.to_string(),
                    value: v.clone(),
                })
            })
            .transpose()
    };
    // The pod's limits, with what they were computed from.
    let pod_memory = num(CRI_MEMORY)?.filter(|b| *b > 0).map(|bytes| {
        let mib = u64::from(config.memory_mib) + bytes.div_ceil(1 << 20);
        let from = format!(
            "the pod's CRI memory limit ({CRI_MEMORY}={bytes}, {} MiB, plus the guest overhead \
             memory_mib = {}: {mib} MiB)",
            bytes.div_ceil(1 << 20),
            config.memory_mib
        );
        (mib, from)
    });
    let pod_cpus = match (num(CRI_CPU_QUOTA)?, num(CRI_CPU_PERIOD)?) {
        (Some(q), Some(p)) if q > 0 && p > 0 => {
            let n = q.div_ceil(p);
            let from = format!(
                "the pod's CRI CPU limit ({CRI_CPU_QUOTA}={q} / {CRI_CPU_PERIOD}={p}: {n} vCPUs)"
            );
            Some((n, from))
        }
        _ => None,
    };
    // Each size, and who asked for it.
    let (memory, memory_asker) = match (num(MEMORY_ANNOTATION)?, pod_memory) {
        (Some(m), Some((limit, from))) if m > limit => {
            return Err(SpecError::OverPodLimit {
                key: MEMORY_ANNOTATION,
                asked: m,
                unit: "MiB",
                limit: from,
            })
        }
        (Some(m), _) => (m, format!("annotation {MEMORY_ANNOTATION}={m}")),
        (None, Some((m, from))) => (m, from),
        (None, None) => (u64::from(config.memory_mib), "config memory_mib".into()),
    };
    let (cpus, cpus_asker) = match (num(VCPUS_ANNOTATION)?, pod_cpus) {
        (Some(n), Some((limit, from))) if n > limit => {
            return Err(SpecError::OverPodLimit {
                key: VCPUS_ANNOTATION,
                asked: n,
                unit: "vCPUs",
                limit: from,
            })
        }
        (Some(n), _) => (n, format!("annotation {VCPUS_ANNOTATION}={n}")),
        (None, Some((n, from))) => (n, from),
        (None, None) => (u64::from(config.vcpus), "config vcpus".into()),
    };
    config
        .check_vm_size(cpus, memory)
        .map_err(|source| SpecError::Size {
            asker: if source.is_vcpus() {
                cpus_asker
            } else {
                memory_asker
            },
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRI_LIKE: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "hooks": {"prestart": [{"path": "/usr/bin/true"}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/containerd/x/hosts", "options": ["rbind", "ro"]},
            {"destination": "/etc/resolv.conf", "source": "/var/lib/x/resolv.conf", "options": ["bind"]}
        ],
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1"
        },
        "linux": {
            "cgroupsPath": "/kubepods/pod1/c1",
            "namespaces": [
                {"type": "network", "path": "/var/run/netns/cni-1234"},
                {"type": "pid"}
            ]
        }
    }"#;

    #[test]
    fn host_references_are_removed() {
        let spec: Spec = serde_json::from_str(CRI_LIKE).unwrap();
        let (spec, dropped) = for_guest(spec);
        assert!(spec.hooks().is_none());
        assert!(dropped.hooks);
        assert_eq!(dropped.bind_mounts, vec!["/etc/hosts", "/etc/resolv.conf"]);
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].destination(), Path::new("/proc"));
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.cgroups_path().is_none());
        let ns = linux.namespaces().as_ref().unwrap();
        assert_eq!(ns.len(), 2);
        assert!(ns.iter().all(|n| n.path().is_none()));
    }

    #[test]
    fn cri_annotations_name_the_pod() {
        let spec: Spec = serde_json::from_str(CRI_LIKE).unwrap();
        assert_eq!(pod_of(&spec), Some(("pod1".into(), false)));
        let plain: Spec =
            serde_json::from_str(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#).unwrap();
        assert_eq!(pod_of(&plain), None);
    }

    fn annotated(pairs: &[(&str, &str)]) -> Spec {
        let mut spec = Spec::default();
        spec.set_annotations(Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        spec
    }

    /// 1 GiB and 1.5 CPUs, as containerd 1.7 hands a pod's limits over.
    const POD_LIMITS: [(&str, &str); 3] = [
        (CRI_MEMORY, "1073741824"),
        (CRI_CPU_QUOTA, "150000"),
        (CRI_CPU_PERIOD, "100000"),
    ];

    fn size(pairs: &[(&str, &str)]) -> Result<(u8, u32), String> {
        vm_size(&annotated(pairs), &RuntimeConfig::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_vm_is_sized_from_annotations_or_pod_limits() {
        let config = RuntimeConfig::default();
        assert_eq!(vm_size(&Spec::default(), &config).unwrap(), (1, 256));
        assert_eq!(
            size(&[(VCPUS_ANNOTATION, "2"), (MEMORY_ANNOTATION, "512")]),
            Ok((2, 512))
        );
        assert_eq!(size(&POD_LIMITS), Ok((2, 256 + 1024)));
        // Annotations choose within the pod's limits.
        let within = [
            POD_LIMITS.as_slice(),
            &[(VCPUS_ANNOTATION, "1"), (MEMORY_ANNOTATION, "1280")],
        ]
        .concat();
        assert_eq!(size(&within), Ok((1, 1280)));
        let err = size(&[(MEMORY_ANNOTATION, "lots")]).unwrap_err();
        assert_eq!(
            err,
            "annotation io.airlock.memory-mib=\"lots\" is not a whole number"
        );
    }

    #[test]
    fn annotations_stay_within_the_config_limits() {
        assert_eq!(
            size(&[(VCPUS_ANNOTATION, "9")]).unwrap_err(),
            "annotation io.airlock.vcpus=9: 9 vCPUs is more than runtime config [limits] max_vcpus = 8"
        );
        assert_eq!(
            size(&[(VCPUS_ANNOTATION, "1000")]).unwrap_err(),
            "annotation io.airlock.vcpus=1000: 1000 vCPUs is more than runtime config [limits] max_vcpus = 8"
        );
        assert_eq!(
            size(&[(MEMORY_ANNOTATION, "8193")]).unwrap_err(),
            "annotation io.airlock.memory-mib=8193: 8193 MiB of memory is more than runtime config [limits] max_memory_mib = 8192"
        );
        assert_eq!(
            size(&[(VCPUS_ANNOTATION, "8"), (MEMORY_ANNOTATION, "8192")]),
            Ok((8, 8192))
        );
        // The limits are the config's.
        let mut config = RuntimeConfig::default();
        config.limits.max_memory_mib = 16384;
        let s = annotated(&[(MEMORY_ANNOTATION, "16384")]);
        assert_eq!(vm_size(&s, &config).unwrap(), (1, 16384));
    }

    #[test]
    fn zero_is_refused() {
        assert_eq!(
            size(&[(VCPUS_ANNOTATION, "0")]).unwrap_err(),
            "annotation io.airlock.vcpus=0: 0 vCPUs: a microVM needs at least 1"
        );
        assert_eq!(
            size(&[(MEMORY_ANNOTATION, "0")]).unwrap_err(),
            "annotation io.airlock.memory-mib=0: 0 MiB of memory is less than the 64 MiB a guest needs"
        );
    }

    #[test]
    fn annotations_stay_within_the_pods_limits() {
        let over = [POD_LIMITS.as_slice(), &[(MEMORY_ANNOTATION, "4096")]].concat();
        assert_eq!(
            size(&over).unwrap_err(),
            "annotation io.airlock.memory-mib=4096: 4096 MiB is more than the pod's CRI memory \
             limit (io.kubernetes.cri.sandbox-memory=1073741824, 1024 MiB, plus the guest overhead \
             memory_mib = 256: 1280 MiB)"
        );
        let over = [POD_LIMITS.as_slice(), &[(VCPUS_ANNOTATION, "4")]].concat();
        assert_eq!(
            size(&over).unwrap_err(),
            "annotation io.airlock.vcpus=4: 4 vCPUs is more than the pod's CRI CPU limit \
             (io.kubernetes.cri.sandbox-cpu-quota=150000 / io.kubernetes.cri.sandbox-cpu-period=100000: 2 vCPUs)"
        );
    }

    #[test]
    fn pod_limits_over_the_config_limits_are_refused_not_shrunk() {
        let err = size(&[(CRI_MEMORY, "17179869184")]).unwrap_err();
        assert_eq!(
            err,
            "the pod's CRI memory limit (io.kubernetes.cri.sandbox-memory=17179869184, 16384 MiB, \
             plus the guest overhead memory_mib = 256: 16640 MiB): 16640 MiB of memory is more than \
             runtime config [limits] max_memory_mib = 8192"
        );
        let err = size(&[(CRI_CPU_QUOTA, "1600000"), (CRI_CPU_PERIOD, "100000")]).unwrap_err();
        assert!(
            err.starts_with("the pod's CRI CPU limit (io.kubernetes.cri.sandbox-cpu-quota=1600000")
                && err.ends_with("16 vCPUs is more than runtime config [limits] max_vcpus = 8"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_bundle_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("cannot read the OCI spec "), "{err}");
        std::fs::write(dir.path().join("config.json"), "{nope").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("malformed OCI spec "), "{err}");
    }
}
