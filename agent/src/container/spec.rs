//! The OCI runtime spec the runtime sent, adapted to this guest before
//! libcontainer sees it: the root is the agent's mount of the workload
//! image, the cgroup is the agent's, and the namespaces Airlock promises
//! (pid, mount, uts, ipc) are always there.

use std::path::Path;

use oci_spec::runtime::{
    LinuxBuilder, LinuxNamespace, LinuxNamespaceType, Process, RootBuilder, Spec,
};

use super::cgroup::Cgroup;

/// Namespaces every container gets, whatever the spec says.
pub const REQUIRED_NAMESPACES: &[LinuxNamespaceType] = &[
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Mount,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Ipc,
];

/// A spec the agent cannot use.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid OCI spec")]
    Parse(#[source] serde_json::Error),
    #[error("invalid OCI spec: {0}")]
    Invalid(&'static str),
}

/// Parses the runtime's `config.json` bytes.
pub fn parse(json: &[u8]) -> Result<Spec, SpecError> {
    let spec: Spec = serde_json::from_slice(json).map_err(SpecError::Parse)?;
    if !spec.version().starts_with("1.") {
        return Err(SpecError::Invalid("ociVersion must be 1.x"));
    }
    check_process(
        spec.process()
            .as_ref()
            .ok_or(SpecError::Invalid("no process"))?,
    )?;
    Ok(spec)
}

/// Parses an exec's OCI process object.
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    let process: Process = serde_json::from_slice(json).map_err(SpecError::Parse)?;
    check_process(&process)?;
    Ok(process)
}

fn check_process(p: &Process) -> Result<(), SpecError> {
    match p.args() {
        Some(args) if !args.is_empty() && !args[0].is_empty() => Ok(()),
        _ => Err(SpecError::Invalid("process.args is empty")),
    }
}

/// Points the spec at `rootfs` and the agent's cgroup for container `id`,
/// and adds the required namespaces.
pub fn adapt(mut spec: Spec, id: &str, rootfs: &Path) -> Result<Spec, SpecError> {
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let root = RootBuilder::default()
        .path(rootfs)
        .readonly(readonly)
        .build()
        .map_err(|_| SpecError::Invalid("cannot set root"))?;
    spec.set_root(Some(root));

    let mut linux = match spec.linux().clone() {
        Some(l) => l,
        None => LinuxBuilder::default()
            .build()
            .map_err(|_| SpecError::Invalid("cannot build linux section"))?,
    };
    linux.set_cgroups_path(Some(Cgroup::spec_path(id).into()));
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    for &ty in REQUIRED_NAMESPACES {
        if !namespaces.iter().any(|ns| ns.typ() == ty) {
            let mut ns = LinuxNamespace::default();
            ns.set_typ(ty);
            namespaces.push(ns);
        }
    }
    // A path would join an existing namespace: of the guest's own (the
    // agent's), which would undo the isolation.
    for ns in &mut namespaces {
        if REQUIRED_NAMESPACES.contains(&ns.typ()) {
            ns.set_path(None);
        }
    }
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(extra: &str) -> String {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
               "root":{{"path":"rootfs","readonly":true}}{extra}}}"#
        )
    }

    #[test]
    fn adapt_sets_root_cgroup_and_namespaces() {
        let json = minimal(
            r#","linux":{"namespaces":[{"type":"pid","path":"/proc/1/ns/pid"},{"type":"network"}]}"#,
        );
        let spec = adapt(
            parse(json.as_bytes()).unwrap(),
            "c1",
            Path::new("/run/x/rootfs"),
        )
        .unwrap();
        let root = spec.root().as_ref().unwrap();
        assert_eq!(root.path(), Path::new("/run/x/rootfs"));
        assert_eq!(root.readonly(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/airlock/c1"))
        );
        let ns = linux.namespaces().as_ref().unwrap();
        for ty in REQUIRED_NAMESPACES {
            let found: Vec<_> = ns.iter().filter(|n| n.typ() == *ty).collect();
            assert_eq!(found.len(), 1, "{ty:?}");
            assert!(found[0].path().is_none(), "{ty:?} must be a new namespace");
        }
        assert!(ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        let err = airlock_report::chain(&parse(b"{not json").unwrap_err());
        assert!(err.starts_with("invalid OCI spec: "), "{err}");
        let no_args =
            r#"{"ociVersion":"1.0.2","process":{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}}"#;
        assert_eq!(
            parse(no_args.as_bytes()).unwrap_err().to_string(),
            "invalid OCI spec: process.args is empty"
        );
        let old = minimal("").replace("1.0.2", "0.9");
        assert!(parse(old.as_bytes()).is_err());
        assert!(parse_process(br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0}}"#).is_ok());
        assert!(parse_process(br#"{"cwd":"/"}"#).is_err());
    }
}
