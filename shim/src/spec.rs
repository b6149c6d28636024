//! The bundle's OCI spec, made fit for the guest. What containerd (or the
//! CRI plugin) wrote refers to the host: namespace paths (a CNI network
//! namespace), hooks to run on the host, bind mounts of host files. Inside
//! the microVM none of those exist; the agent adds the rest (root, cgroup,
//! the namespaces every container gets).

use std::path::Path;

use oci_spec::runtime::Spec;

/// A bundle whose spec cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// cannot read the OCI spec {0}: {1}
    #[error("cannot read the OCI spec {0}: {1}")]
    Read(String, std::io::Error),
    /// malformed OCI spec {0}: {1}
    #[error("malformed OCI spec {0}: {1}")]
    Parse(String, String),
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
/// annotations if set; else the pod's limits from the CRI annotations plus
/// the configured memory as the guest's own overhead; else the config's.
pub fn vm_size(spec: &Spec, vcpus: u8, memory_mib: u32) -> Result<(u8, u32), String> {
    let empty = std::collections::HashMap::new();
    let a = spec.annotations().as_ref().unwrap_or(&empty);
    let num = |key: &str| -> Result<Option<u64>, String> {
        a.get(key)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("annotation {key}={v:?} is not a whole number"))
            })
            .transpose()
    };
    let memory = match (num(MEMORY_ANNOTATION)?, num(CRI_MEMORY)?) {
        (Some(m), _) => m,
        (None, Some(bytes)) if bytes > 0 => u64::from(memory_mib) + bytes.div_ceil(1 << 20),
        _ => u64::from(memory_mib),
    };
    let cpus = match (
        num(VCPUS_ANNOTATION)?,
        num(CRI_CPU_QUOTA)?,
        num(CRI_CPU_PERIOD)?,
    ) {
        (Some(n), _, _) => n,
        (None, Some(q), Some(p)) if q > 0 && p > 0 => q.div_ceil(p),
        _ => u64::from(vcpus),
    };
    let cpus = u8::try_from(cpus).map_err(|_| format!("{cpus} vCPUs is too many"))?;
    let memory = u32::try_from(memory).map_err(|_| format!("{memory} MiB is too much"))?;
    Ok((cpus, memory))
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

    #[test]
    fn the_vm_is_sized_from_annotations_or_pod_limits() {
        assert_eq!(vm_size(&Spec::default(), 1, 256), Ok((1, 256)));
        let s = annotated(&[(VCPUS_ANNOTATION, "2"), (MEMORY_ANNOTATION, "512")]);
        assert_eq!(vm_size(&s, 1, 256), Ok((2, 512)));
        // containerd 1.7's pod limits: 1 GiB and 1.5 CPUs.
        let s = annotated(&[
            (CRI_MEMORY, "1073741824"),
            (CRI_CPU_QUOTA, "150000"),
            (CRI_CPU_PERIOD, "100000"),
        ]);
        assert_eq!(vm_size(&s, 1, 256), Ok((2, 256 + 1024)));
        let bad = annotated(&[(MEMORY_ANNOTATION, "lots")]);
        let err = vm_size(&bad, 1, 256).unwrap_err();
        assert!(err.contains("io.airlock.memory-mib"), "{err}");
        assert!(vm_size(&annotated(&[(VCPUS_ANNOTATION, "1000")]), 1, 256).is_err());
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
