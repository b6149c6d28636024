//! The sandbox's network namespace on the host, made and removed with
//! iproute2 (`ip netns add airlock-<id>`), so that the standard tools see
//! it: `ip netns exec airlock-<id> nft list ruleset` shows its policy.
//!
//! Why iproute2 and not netlink from Rust: `ip netns add` is what every
//! tool agrees on for a named namespace (the bind mount under /run/netns
//! and its propagation), and the handful of link and address changes a
//! sandbox needs are one `ip` call each; a netlink crate would add an
//! async stack for no gain in what is checked.

use std::path::PathBuf;
use std::process::Command;

use super::NetError;

/// Where iproute2 keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A network namespace: one of Airlock's own (named, under /run/netns),
/// or one made by someone else (a pod's, from CNI), by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    path: PathBuf,
    /// Set for Airlock's own, which it creates and deletes.
    name: Option<String>,
}

impl Netns {
    /// The namespace of sandbox `id` (not created).
    pub fn for_sandbox(id: &str) -> Self {
        let name = format!("airlock-{id}");
        Self {
            path: PathBuf::from(NETNS_DIR).join(&name),
            name: Some(name),
        }
    }

    /// The namespace bind-mounted at `path` (a pod's).
    pub fn at(path: &std::path::Path) -> Self {
        Self {
            path: path.to_path_buf(),
            name: None,
        }
    }

    /// Creates it (Airlock's own only).
    pub fn create(&self) -> Result<(), NetError> {
        if let Some(name) = &self.name {
            run(
                ip_command().args(["netns", "add", name]),
                "create the network namespace",
            )?;
        }
        Ok(())
    }

    /// Deletes it, if it exists and is Airlock's own; whatever is in it
    /// (taps, veths, nft tables) goes with it once no process holds it.
    pub fn delete(&self) -> Result<(), NetError> {
        match &self.name {
            Some(name) if self.path.exists() => {
                run(
                    ip_command().args(["netns", "delete", name]),
                    "delete the network namespace",
                )?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Its name for iproute2 (`ip link ... netns NAME`), else its path.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.path.display().to_string())
    }

    /// Its bind mount, which `setns(2)` opens.
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// `ip ARGS...` inside the namespace.
    pub fn ip(&self, args: &[&str], what: &'static str) -> Result<String, NetError> {
        self.run_in(|| run(ip_command().args(args), what))
    }

    /// Runs `f` on a thread that has joined the namespace: what it opens
    /// there (a tap, a socket) stays in the namespace.
    pub fn run_in<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, NetError> + Send,
    ) -> Result<T, NetError> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path)
                    .map_err(|e| NetError::io("open the network namespace", path.clone(), e))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetError::io("join the network namespace", path.clone(), e.into())
                })?;
                f()
            })
            .join()
            .unwrap_or(Err(NetError::Panicked))
        })
    }
}

/// Runs `cmd`; its stdout, or its stderr in the error.
pub fn run(cmd: &mut Command, what: &'static str) -> Result<String, NetError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .map_err(|e| NetError::Spawn(program.clone(), e))?;
    if !out.status.success() {
        return Err(NetError::Command {
            what,
            command: format!(
                "{program} {}",
                cmd.get_args()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `Command` for iproute2's `ip`.
pub fn ip_command() -> Command {
    Command::new(super::support::tool("ip"))
}
