//! The OCI runtime spec the runtime sent, adapted to this guest before
//! libcontainer sees it: the root is the agent's mount of the workload
//! image, the cgroup is the agent's, the namespaces Airlock promises
//! (pid, mount, uts, ipc) are always there, the network namespace never
//! is (every container shares the VM's network), and `/etc/resolv.conf`
//! and `/etc/hosts` are the sandbox's (see `network/`).

use std::path::Path;

use oci_spec::runtime::{
    LinuxBuilder, LinuxNamespace, LinuxNamespaceType, Mount, MountBuilder, Process, RootBuilder,
    Spec,
};

use super::cgroup::Cgroup;
use crate::network::dns;

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
/// adds the required namespaces and removes the network one, and mounts
/// the DNS files in `net_dir` at `/etc`.
pub fn adapt(mut spec: Spec, id: &str, rootfs: &Path, net_dir: &Path) -> Result<Spec, SpecError> {
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
    // One network per sandbox, as one per pod: the containers share the
    // VM's network namespace, with its NIC and its `lo`, so `localhost`
    // reaches the other containers; the VM is the isolation boundary. A
    // namespace of its own would be empty (no NIC can be moved into it):
    // no network at all, as `ctr run` and CRI containers used to get.
    namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
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
    dns_mounts(&mut spec, net_dir)?;
    Ok(spec)
}

/// Where the DNS files go in a container.
const DNS_FILES: [(&str, &str); 2] = [
    ("/etc/resolv.conf", dns::RESOLV_CONF),
    ("/etc/hosts", dns::HOSTS),
];

/// Replaces any mount of the DNS files' destinations with read-only bind
/// mounts of the sandbox's.
fn dns_mounts(spec: &mut Spec, net_dir: &Path) -> Result<(), SpecError> {
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    // Path equality compares components: "/etc//hosts" and "/etc/hosts/"
    // are the same destination.
    mounts.retain(|m| {
        !DNS_FILES
            .iter()
            .any(|(dest, _)| m.destination() == Path::new(dest))
    });
    for (dest, name) in DNS_FILES {
        mounts.push(dns_mount(dest, &net_dir.join(name))?);
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

fn dns_mount(destination: &str, source: &Path) -> Result<Mount, SpecError> {
    let options = ["bind", "ro", "nosuid", "nodev", "noexec"].map(String::from);
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(options.to_vec())
        .build()
        .map_err(|_| SpecError::Invalid("cannot build the DNS files' mounts"))
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
            Path::new("/run/net"),
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
        // The network namespace asked for is gone: the VM's is shared.
        assert!(!ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
        // The DNS files are mounted, and nothing else was.
        let mounts = spec.mounts().as_ref().unwrap();
        let dests: Vec<_> = mounts.iter().map(|m| m.destination().clone()).collect();
        assert_eq!(
            dests,
            [Path::new("/etc/resolv.conf"), Path::new("/etc/hosts")]
        );
    }

    #[test]
    fn the_sandbox_dns_files_replace_the_specs() {
        let json = minimal(
            r#","mounts":[
                {"destination":"/proc","type":"proc","source":"proc"},
                {"destination":"/etc/hosts/","type":"bind","source":"/host/hosts","options":["rbind","rw"]},
                {"destination":"/etc//resolv.conf","type":"bind","source":"/host/resolv.conf"},
                {"destination":"/etc/hostname","type":"bind","source":"/host/hostname"}]"#,
        );
        let spec = adapt(
            parse(json.as_bytes()).unwrap(),
            "c1",
            Path::new("/r"),
            Path::new("/run/net"),
        )
        .unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        let summary: Vec<(String, String)> = mounts
            .iter()
            .map(|m| {
                let src = m.source().as_ref().unwrap().display().to_string();
                (m.destination().display().to_string(), src)
            })
            .collect();
        let pair = |d: &str, s: &str| (d.to_string(), s.to_string());
        assert_eq!(
            summary,
            [
                pair("/proc", "proc"),
                pair("/etc/hostname", "/host/hostname"),
                pair("/etc/resolv.conf", "/run/net/resolv.conf"),
                pair("/etc/hosts", "/run/net/hosts"),
            ]
        );
        let hosts = &mounts[3];
        assert_eq!(hosts.typ().as_deref(), Some("bind"));
        let opts = hosts.options().as_ref().unwrap();
        assert!(opts.iter().any(|o| o == "ro"), "{opts:?}");
        assert!(opts.iter().any(|o| o == "bind"), "{opts:?}");
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
