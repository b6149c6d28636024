//! [`Fake`]: a directory standing for the guest (see `machine/mod.rs`).

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use oci_spec::runtime::{Process, Spec};

use super::{Launch, Machine};
use crate::container::rootfs::{self, Layout, RootfsError};
use crate::launcher::exec_check::{self, ExecFailure, ExecKind};
use crate::launcher::{LaunchError, Reply, Request};
use crate::network;
use crate::network::link::{by_mac, Link, LinkError};
use crate::process::exits::{Exit, Exits};

/// A directory standing for the guest (see the module's comment): it never
/// mounts or launches anything, unless made [`Fake::with_processes`].
pub struct Fake {
    root: PathBuf,
    scratch: PathBuf,
    bundles: PathBuf,
    net: PathBuf,
    /// Every network configuration applied.
    network_log: Arc<Mutex<Vec<network::Config>>>,
    /// Containers get a directory as rootfs and host processes.
    processes: bool,
}

/// The kernel's limit on a hostname (`HOST_NAME_MAX`).
const HOST_NAME_MAX: usize = 64;

impl Fake {
    /// The MAC address of the fake's one NIC, `fake0`.
    pub const NIC_MAC: &'static str = "02:00:00:00:00:01";

    /// A fake guest in `dir`: `dir/root` (the guest's `/`), `dir/scratch`,
    /// `dir/bundles` and `dir/net`, created if missing.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        let fake = Self {
            root: dir.join("root"),
            scratch: dir.join("scratch"),
            bundles: dir.join("bundles"),
            net: dir.join("net"),
            network_log: Arc::default(),
            processes: false,
        };
        for d in [&fake.root, &fake.scratch, &fake.bundles, &fake.net] {
            std::fs::create_dir_all(d)?;
        }
        Ok(fake)
    }

    /// A fake guest whose containers are created and whose processes run:
    /// each is the spec's `args` started on the host (in the fake's root
    /// directory, with the spec's environment), with the stdio it was
    /// given. A program that cannot be found or run fails as the launcher
    /// reports it, with its [`ExecFailure`]. Terminals are refused. For
    /// unit tests: the programs run as this process's user, unconfined.
    pub fn with_processes(dir: &Path) -> std::io::Result<Self> {
        Ok(Self {
            processes: true,
            ..Self::new(dir)?
        })
    }

    /// The network configurations this fake was given, in order (shared:
    /// take it before the fake goes into a sandbox).
    pub fn network_log(&self) -> Arc<Mutex<Vec<network::Config>>> {
        self.network_log.clone()
    }

    fn start(
        &self,
        exits: &Arc<Exits>,
        spec: Process,
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, LaunchError> {
        let failed =
            |message: String, exec: Option<ExecFailure>| LaunchError::Failed { message, exec };
        let args = spec.args().clone().unwrap_or_default();
        let env = spec.env().clone().unwrap_or_default();
        let Some(program) = args.first() else {
            return Err(failed("the process has no args".into(), None));
        };
        let path = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("");
        let kind = exec_check::lookup(program, path);
        if kind != ExecKind::Other {
            let message = format!("executable '{program}' cannot be run: {kind:?}");
            let exec = ExecFailure {
                kind,
                executable: program.clone(),
            };
            return Err(failed(message, Some(exec)));
        }
        let mut cmd = Command::new(program);
        cmd.args(&args[1..]).current_dir(&self.root).env_clear();
        for (k, v) in env.iter().filter_map(|e| e.split_once('=')) {
            cmd.env(k, v);
        }
        if let Ok([stdin, stdout, stderr]) = <[OwnedFd; 3]>::try_from(fds) {
            cmd.stdin(stdin).stdout(stdout).stderr(stderr);
        } else {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        let mut child = cmd.spawn().map_err(|e| failed(e.to_string(), None))?;
        let pid = i32::try_from(child.id()).map_err(|e| failed(e.to_string(), None))?;
        // Its exit reaches `exits` as PID 1's reaper would hand it out.
        let exits = exits.clone();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let exit = match (status.code(), status.signal()) {
                    (Some(code), _) => Exit::Code(code),
                    (None, Some(sig)) => Exit::Signal(sig),
                    (None, None) => Exit::Signal(libc::SIGKILL),
                };
                exits.record(pid, exit);
            }
        });
        Ok(Reply::Pid(pid))
    }

    fn perform(
        &self,
        exits: &Arc<Exits>,
        req: Request,
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, LaunchError> {
        let read = |path: &Path| -> Result<Vec<u8>, LaunchError> {
            std::fs::read(path).map_err(|e| LaunchError::Failed {
                message: e.to_string(),
                exec: None,
            })
        };
        let no_tty = || LaunchError::Failed {
            message: "the fake has no terminals".into(),
            exec: None,
        };
        match req {
            Request::Create {
                console_socket: Some(_),
                ..
            }
            | Request::Exec {
                console_socket: Some(_),
                ..
            } => Err(no_tty()),
            Request::Create { bundle, .. } => {
                let spec: Spec = serde_json::from_slice(&read(&bundle.join("config.json"))?)
                    .map_err(|e| LaunchError::Failed {
                        message: e.to_string(),
                        exec: None,
                    })?;
                let process = spec.process().clone().unwrap_or_default();
                self.start(exits, process, fds)
            }
            Request::Exec { process, .. } => {
                let process: Process =
                    serde_json::from_slice(&read(&process)?).map_err(|e| LaunchError::Failed {
                        message: e.to_string(),
                        exec: None,
                    })?;
                self.start(exits, process, fds)
            }
            Request::Start { .. } | Request::Delete { .. } => Ok(Reply::Done),
        }
    }
}

impl Machine for Fake {
    fn root(&self) -> &Path {
        &self.root
    }

    fn scratch(&self) -> &Path {
        &self.scratch
    }

    fn bundles(&self) -> &Path {
        &self.bundles
    }

    fn net_dir(&self) -> &Path {
        &self.net
    }

    fn configure_network(&self, config: &network::Config) -> Result<(), LinkError> {
        let nics = [
            Link {
                index: 1,
                name: "lo".into(),
                mac: Some([0; 6]),
            },
            Link {
                index: 2,
                name: "fake0".into(),
                mac: network::config::parse_mac(Self::NIC_MAC),
            },
        ];
        for nic in &config.interfaces {
            by_mac(&nics, &nic.mac)?;
        }
        self.network_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(config.clone());
        Ok(())
    }

    fn set_hostname(&self, name: &str) -> nix::Result<()> {
        if name.len() > HOST_NAME_MAX {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    fn set_clock(&self, _: i64) -> nix::Result<()> {
        Ok(())
    }

    fn mount_scratch(&self, _: &str) -> nix::Result<()> {
        Ok(())
    }

    fn mount_rootfs(
        &self,
        source: &str,
        fstype: &str,
        options: &[String],
        layout: &Layout,
    ) -> Result<(), RootfsError> {
        rootfs::image_flags(options)?;
        if self.processes {
            return std::fs::create_dir_all(&layout.rootfs).map_err(|e| {
                RootfsError::Image(
                    source.into(),
                    fstype.into(),
                    layout.lower.clone(),
                    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                )
            });
        }
        Err(RootfsError::Image(
            source.into(),
            fstype.into(),
            layout.lower.clone(),
            Errno::EPERM,
        ))
    }

    fn unmount_rootfs(&self, _: &Layout) {}

    fn launch<'a>(&'a self, exits: &'a Arc<Exits>, req: Request, fds: Vec<OwnedFd>) -> Launch<'a> {
        if !self.processes {
            let message = "the fake machine launches nothing".to_string();
            return Box::pin(std::future::ready(Err(LaunchError::Failed {
                message,
                exec: None,
            })));
        }
        Box::pin(std::future::ready(self.perform(exits, req, fds)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fake_refuses_every_mount_and_keeps_to_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new(dir.path()).unwrap();
        assert_eq!(fake.root(), dir.path().join("root"));
        assert!(fake.scratch().is_dir() && fake.bundles().is_dir());
        let layout = Layout::new(&fake.bundles.join("c"), &fake.scratch.join("c"));
        let err = fake.mount_rootfs("/", "", &[], &layout).unwrap_err();
        assert!(matches!(err, RootfsError::Image(..)), "{err}");
        let err = fake
            .mount_rootfs("/", "", &["data=journal".into()], &layout)
            .unwrap_err();
        assert!(matches!(err, RootfsError::Option(_)), "{err}");
        // Nothing was created for the container.
        assert!(!layout.lower.exists());
        assert_eq!(fake.set_hostname(&"h".repeat(65)), Err(Errno::EINVAL));
        assert_eq!(fake.set_hostname("h"), Ok(()));
    }
}
