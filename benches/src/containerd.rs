//! A private containerd (Debian's package) for the runc and shim peers:
//! its own root, state and socket under /run, the release
//! `containerd-shim-airlock-v2` on its PATH, the busybox test image
//! imported, stopped on drop. (Not `airlock-e2e`'s helper: depending on
//! that crate would build the benchmarked `airlock-vmm` with its test
//! hooks.)

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub const NAMESPACE: &str = "airlock-bench";
pub const IMAGE: &str = "airlock-bench:1";
pub const RUNC: &str = "io.containerd.runc.v2";
pub const AIRLOCK: &str = "io.containerd.airlock.v2";

pub struct Containerd {
    dir: PathBuf,
    child: Child,
}

impl Containerd {
    pub fn start() -> anyhow::Result<Self> {
        let dir = PathBuf::from(format!(
            "/run/airlock-bench-containerd-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let d = dir.display();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n"
            ),
        )?;
        let release = std::fs::canonicalize("target/release")?;
        if !release.join("containerd-shim-airlock-v2").is_file() {
            bail!("target/release/containerd-shim-airlock-v2 is missing: run scripts/setup");
        }
        let path = format!(
            "{}:{}",
            release.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("containerd not found: run scripts/setup")?;
        let c = Containerd { dir, child };
        let until = Instant::now() + Duration::from_secs(30);
        while c.ctr(&["version"]).is_err() {
            if Instant::now() > until {
                bail!(
                    "containerd did not come up in 30 s; see {}",
                    c.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let tar = c.dir.join("image.tar");
        let made = Command::new("tests/e2e/make-oci-image")
            .arg(&tar)
            .args(["sleep", "2147483647"])
            .status()
            .context("tests/e2e/make-oci-image")?;
        if !made.success() {
            bail!("tests/e2e/make-oci-image failed");
        }
        let tar = tar.display().to_string();
        c.ctr(&["images", "import", "--index-name", IMAGE, &tar])?;
        Ok(c)
    }

    /// `ctr` against this containerd.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr ARGS`; an error carries its stderr.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args).output().context("ctr not found")?;
        if !out.status.success() {
            bail!(
                "ctr {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops and deletes a task and its container, ignoring what is gone.
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let until = Instant::now() + Duration::from_secs(60);
        while self.ctr(&["task", "delete", id]).is_err() && Instant::now() < until {
            if self
                .ctr(&["task", "ls", "-q"])
                .is_ok_and(|l| !l.lines().any(|t| t == id))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.ctr(&["container", "delete", id]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill only reads its arguments.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let prefix = self.dir.display().to_string();
        for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if m.starts_with(&prefix) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
