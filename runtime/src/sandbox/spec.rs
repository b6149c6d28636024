//! The OCI runtime spec of a sandbox's container, and the process objects
//! of `exec`s: built from oci-spec's defaults (runc's), a user's
//! `config.json` if one was given, the image's config and the command line.

use std::path::Path;

use oci_spec::runtime::{Mount, MountBuilder, Process, Spec};

/// Where the agent's own binary appears inside a long-lived sandbox's
/// container, as its placeholder init (`airlock-agent pause`).
pub const PAUSE_PATH: &str = "/.airlock/pause";
/// The default PATH when neither the image nor the spec sets one.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A spec that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid OCI spec {0}: {1}")]
    Parse(String, String),
    #[error("invalid OCI spec {0}: {1}")]
    Invalid(String, &'static str),
    #[error("Cannot read the OCI spec {0}: {1}")]
    Read(String, std::io::Error),
    #[error("no command: give one after `--`, or use an image that has one")]
    NoCommand,
}

/// What the command line says about the process.
#[derive(Debug, Clone, Default)]
pub struct ProcessOptions {
    /// The command; empty takes the image's entrypoint and cmd.
    pub args: Vec<String>,
    /// `K=V` pairs, added after (and so overriding) the image's.
    pub env: Vec<String>,
    /// Working directory; `None` takes the image's, else `/`.
    pub cwd: Option<String>,
    /// Allocate a terminal.
    pub tty: bool,
}

/// What an image's config says about its process (OCI image config).
#[derive(Debug, Clone, Default)]
pub struct ImageDefaults {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
}

/// Reads and checks a user's `config.json`.
pub fn load(path: &Path) -> Result<Spec, SpecError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| SpecError::Read(name.clone(), e))?;
    let spec: Spec = serde_json::from_slice(&bytes)
        .map_err(|e| SpecError::Parse(name.clone(), e.to_string()))?;
    if !spec.version().starts_with("1.") {
        return Err(SpecError::Invalid(name, "ociVersion must be 1.x"));
    }
    Ok(spec)
}

/// The container's spec: `base` (or runc's defaults) with a writable root
/// unless `base` asks for a read-only one, the sandbox's hostname, and the
/// process the options and image describe.
pub fn container_spec(
    base: Option<Spec>,
    hostname: &str,
    opts: &ProcessOptions,
    image: &ImageDefaults,
) -> Result<Spec, SpecError> {
    let user_gave_spec = base.is_some();
    let mut spec = base.unwrap_or_default();
    if !user_gave_spec {
        // runc's default root is read-only; a sandbox's writes go to its
        // scratch disk instead (the overlay's upper layer).
        if let Some(root) = spec.root().clone() {
            let mut root = root;
            root.set_readonly(Some(false));
            spec.set_root(Some(root));
        }
        // No network device in the guest: a network namespace would only
        // hide the loopback interface.
        if let Some(mut linux) = spec.linux().clone() {
            if let Some(ns) = linux.namespaces().clone() {
                let ns = ns
                    .into_iter()
                    .filter(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Network)
                    .collect();
                linux.set_namespaces(Some(ns));
            }
            spec.set_linux(Some(linux));
        }
    }
    spec.set_hostname(Some(hostname.to_string()));
    let process = process(spec.process().clone(), opts, image, !user_gave_spec)?;
    spec.set_process(Some(process));
    Ok(spec)
}

/// The spec of a long-lived sandbox's container: its init process is the
/// agent's `pause`, bind-mounted read-only from the guest.
pub fn pause_spec(
    base: Option<Spec>,
    hostname: &str,
    image: &ImageDefaults,
) -> Result<Spec, SpecError> {
    let opts = ProcessOptions {
        args: vec![PAUSE_PATH.into(), "pause".into()],
        ..Default::default()
    };
    let mut spec = container_spec(base, hostname, &opts, image)?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(pause_mount());
    spec.set_mounts(Some(mounts));
    Ok(spec)
}

fn pause_mount() -> Mount {
    MountBuilder::default()
        .destination(PAUSE_PATH)
        .typ("bind")
        .source("/init")
        .options(vec![
            "bind".into(),
            "ro".into(),
            "nosuid".into(),
            "nodev".into(),
        ])
        .build()
        .unwrap_or_default()
}

/// An exec's process object: the container's process (user, capabilities,
/// rlimits) with the command, env, cwd and terminal of `opts`.
pub fn exec_process(
    container: &Spec,
    opts: &ProcessOptions,
    image: &ImageDefaults,
) -> Result<Process, SpecError> {
    let mut p = process(container.process().clone(), opts, image, true)?;
    // The container's init might be the pause process: never inherit its
    // command when the caller gave none.
    if opts.args.is_empty() && image.entrypoint.is_empty() && image.cmd.is_empty() {
        return Err(SpecError::NoCommand);
    }
    p.set_terminal(Some(opts.tty));
    Ok(p)
}

fn process(
    base: Option<Process>,
    opts: &ProcessOptions,
    image: &ImageDefaults,
    take_image_env: bool,
) -> Result<Process, SpecError> {
    let mut p = base.unwrap_or_default();
    let args = if !opts.args.is_empty() {
        opts.args.clone()
    } else if !image.entrypoint.is_empty() || !image.cmd.is_empty() {
        image.entrypoint.iter().chain(&image.cmd).cloned().collect()
    } else if let Some(a) = p.args().clone().filter(|a| !a.is_empty()) {
        a
    } else {
        return Err(SpecError::NoCommand);
    };
    p.set_args(Some(args));
    let mut env: Vec<String> = p.env().clone().unwrap_or_default();
    if take_image_env {
        merge_env(&mut env, &image.env);
    }
    merge_env(&mut env, &opts.env);
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.into());
    }
    p.set_env(Some(env));
    if let Some(cwd) = opts
        .cwd
        .clone()
        .or_else(|| image.working_dir.clone())
        .filter(|c| !c.is_empty())
    {
        p.set_cwd(cwd.into());
    }
    p.set_terminal(Some(opts.tty));
    Ok(p)
}

/// Adds `K=V` pairs to `env`, replacing earlier values of the same K.
fn merge_env(env: &mut Vec<String>, add: &[String]) {
    for kv in add {
        let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
        env.push(kv.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> ProcessOptions {
        ProcessOptions {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_give_a_writable_root_and_the_command() {
        let mut o = opts(&["echo", "hi"]);
        o.env = vec!["A=1".into(), "PATH=/bin".into()];
        o.cwd = Some("/tmp".into());
        let spec = container_spec(None, "sb1", &o, &ImageDefaults::default()).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(false));
        assert_eq!(spec.hostname().as_deref(), Some("sb1"));
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec!["echo".to_string(), "hi".to_string()]
        );
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"A=1".to_string()));
        assert_eq!(
            env.iter().filter(|e| e.starts_with("PATH=")).count(),
            1,
            "{env:?}"
        );
        assert!(env.contains(&"PATH=/bin".to_string()));
        assert_eq!(p.cwd(), Path::new("/tmp"));
        let ns = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap();
        assert!(ns
            .iter()
            .all(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Network));
    }

    #[test]
    fn image_entrypoint_and_env_apply_when_no_command_is_given() {
        let image = ImageDefaults {
            env: vec!["LANG=C.UTF-8".into()],
            entrypoint: vec!["python3".into()],
            cmd: vec!["-V".into()],
            working_dir: Some("/app".into()),
        };
        let spec = container_spec(None, "h", &ProcessOptions::default(), &image).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap().join(" "), "python3 -V");
        assert_eq!(p.cwd(), Path::new("/app"));
        assert!(p
            .env()
            .as_ref()
            .unwrap()
            .contains(&"LANG=C.UTF-8".to_string()));
    }

    #[test]
    fn a_user_spec_keeps_its_limits_and_read_only_root() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut base = Spec::default();
        let mut linux = base.linux().clone().unwrap();
        let resources = oci_spec::runtime::LinuxResourcesBuilder::default()
            .memory(
                oci_spec::runtime::LinuxMemoryBuilder::default()
                    .limit(32i64 << 20)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        linux.set_resources(Some(resources));
        base.set_linux(Some(linux));
        std::fs::write(&path, serde_json::to_vec(&base).unwrap()).unwrap();

        let spec = container_spec(
            Some(load(&path).unwrap()),
            "h",
            &opts(&["true"]),
            &ImageDefaults::default(),
        )
        .unwrap();
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let mem = spec
            .linux()
            .as_ref()
            .unwrap()
            .resources()
            .as_ref()
            .unwrap()
            .memory()
            .unwrap();
        assert_eq!(mem.limit(), Some(32 << 20));
    }

    #[test]
    fn corrupt_specs_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, b"{\"ociVersion\": 1.0,").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("invalid OCI spec {}: ", path.display())),
            "{err}"
        );
        assert!(!err.contains('\n'));
        let err = load(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }

    #[test]
    fn pause_spec_mounts_the_agent() {
        let spec = pause_spec(None, "h", &ImageDefaults::default()).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap()[0], PAUSE_PATH);
        let m = spec.mounts().as_ref().unwrap().last().unwrap();
        assert_eq!(m.destination(), Path::new(PAUSE_PATH));
        assert_eq!(m.source().as_deref(), Some(Path::new("/init")));
    }

    #[test]
    fn exec_needs_a_command() {
        let base = pause_spec(None, "h", &ImageDefaults::default()).unwrap();
        assert!(matches!(
            exec_process(&base, &ProcessOptions::default(), &ImageDefaults::default()),
            Err(SpecError::NoCommand)
        ));
        let mut o = opts(&["sh"]);
        o.tty = true;
        let p = exec_process(&base, &o, &ImageDefaults::default()).unwrap();
        assert_eq!(p.terminal(), Some(true));
        assert_eq!(p.args().as_ref().unwrap(), &vec!["sh".to_string()]);
    }
}
