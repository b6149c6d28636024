//! A real containerd (Debian's package) for the shim's tests, started with
//! private root, state and socket paths and stopped again on drop, and
//! `ctr` calls against it with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_root;

/// The namespace the tests use.
pub const NAMESPACE: &str = "airlock-test";
/// The runtime under test.
pub const RUNTIME: &str = "io.containerd.airlock.v2";
/// The test image's name in the CRI plugin's namespace (`k8s.io`), also
/// its sandbox (pause) image.
pub const CRI_IMAGE: &str = "docker.io/library/airlock-test:1";

pub struct Containerd {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd in a fresh dir under /run: a tmpfs, where the
    /// overlayfs snapshotter works (it cannot put its upper dirs on the
    /// test host's overlay /tmp). The release `containerd-shim-airlock-v2`
    /// is on its PATH; the CRI plugin is on only when `cri` is set.
    pub fn start(cri: bool) -> Self {
        Self::start_with(cri, None)
    }

    /// Containerd with the CRI plugin and CNI: Debian's plugins
    /// (/usr/lib/cni, containernetworking-plugins) and `conflist` as the
    /// one network.
    pub fn start_with_cni(conflist: &str) -> Self {
        Self::start_with(true, Some(conflist))
    }

    fn start_with(cri: bool, conflist: Option<&str>) -> Self {
        let dir = PathBuf::from(format!(
            "/run/airlock-e2e-containerd-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("containerd dir");
        let d = dir.display();
        let cni_bin = match conflist {
            Some(list) => {
                let conf = dir.join("cni/conf");
                std::fs::create_dir_all(&conf).expect("CNI conf dir");
                std::fs::write(conf.join("10-airlock-e2e.conflist"), list).expect("CNI conflist");
                "/usr/lib/cni".to_string()
            }
            None => format!("{d}/cni/bin"),
        };
        let plugins = if cri {
            // The runtime handler `airlock`, as deploy/ configures it; the
            // sandbox (pause) image is the test image (no registry here).
            format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
                 \x20 sandbox_image = \"{CRI_IMAGE}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
                 \x20 bin_dir = \"{cni_bin}\"\n  conf_dir = \"{d}/cni/conf\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
                 \x20 runtime_type = \"io.containerd.runc.v2\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.airlock]\n\
                 \x20 runtime_type = \"{RUNTIME}\"\n\
                 \x20 pod_annotations = [\"io.airlock.*\"]\n"
            )
        } else {
            r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"#.to_string()
        };
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n{plugins}"
        );
        std::fs::write(dir.join("config.toml"), config).expect("containerd config");
        let mut c = Self { dir, child: None };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let release = workspace_root().join("target/release");
        assert!(
            release.join("containerd-shim-airlock-v2").is_file(),
            "target/release/containerd-shim-airlock-v2 is missing: run scripts/setup"
        );
        let path = format!(
            "{}:{}",
            release.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("containerd not found: run scripts/setup (Debian's containerd)");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if self.ctr(&["version"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("containerd did not come up in 30 s:\n{}", self.log());
    }

    /// Stops containerd (SIGTERM) and starts it again on the same dirs.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill only reads its arguments.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            child.kill().ok();
            child.wait().ok();
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `ctr` against this containerd, in the test namespace.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        self.ctr_command_in(NAMESPACE, args)
    }

    /// `ctr` against this containerd, in namespace `ns`.
    pub fn ctr_command_in(&self, ns: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .args(["--namespace", ns])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr ARGS` with a 240 s deadline; a hang fails the test with
    /// containerd's log.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let child = self
            .ctr_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr not found: run scripts/setup (Debian's containerd)");
        self.finish(child, args)
    }

    /// Waits for a `ctr` started with [`Containerd::ctr_command`].
    pub fn finish(&self, child: Child, args: &[&str]) -> Output {
        let pid = child.id();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let done = done.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(240);
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    if Instant::now() > until {
                        // SAFETY: kill only reads its arguments.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                false
            })
        };
        let out = child.wait_with_output().expect("wait for ctr");
        done.store(true, std::sync::atomic::Ordering::Release);
        if watchdog.join().unwrap_or(false) {
            panic!(
                "ctr {args:?} hung for 240 s; containerd log:\n{}",
                self.log()
            );
        }
        println!(
            "$ ctr {}\n{}{}-- {:?}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status.code()
        );
        out
    }

    /// Builds the test image (tests/e2e/make-oci-image: busybox, one
    /// layer, no registry) and imports it; returns its name.
    pub fn import_test_image(&self) -> &'static str {
        const NAME: &str = "airlock-test:1";
        self.import_image_as(NAMESPACE, NAME);
        NAME
    }

    /// Imports the test image into namespace `ns` as `name`. Its default
    /// command sleeps, so that it serves as a pod's sandbox image too.
    pub fn import_image_as(&self, ns: &str, name: &str) {
        let tar = self.dir.join("image.tar");
        let made = Command::new(workspace_root().join("tests/e2e/make-oci-image"))
            .arg(&tar)
            .args(["sleep", "2147483647"])
            .status()
            .expect("make-oci-image");
        assert!(made.success());
        self.import_tar(ns, name, &tar);
    }

    /// Imports an image whose one layer is `root` (no command of its own)
    /// into the test namespace as `name`.
    pub fn import_dir_image(&self, root: &Path, name: &str) {
        let tar = self.dir.join("dir-image.tar");
        let made = Command::new(workspace_root().join("scripts/oci-image-from-dir"))
            .arg(root)
            .arg(&tar)
            .status()
            .expect("oci-image-from-dir");
        assert!(made.success());
        self.import_tar(NAMESPACE, name, &tar);
    }

    /// `ctr images import` of the image archive `tar` into `ns` as `name`.
    fn import_tar(&self, ns: &str, name: &str, tar: &Path) {
        let tar = tar.display().to_string();
        let args = ["images", "import", "--index-name", name, &tar];
        let child = self
            .ctr_command_in(ns, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr");
        let out = self.finish(child, &args);
        assert!(out.status.success(), "ctr images import failed");
    }

    /// The tail of containerd's log (the shims' logs are in it too).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let start = text.len().saturating_sub(8000);
        text.get(start..).unwrap_or(&text).to_string()
    }

    /// A task's status in `ctr task ls` (`RUNNING`, `STOPPED`, ...).
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&id))
            .and_then(|f| f.get(2).map(|s| s.to_string()))
    }

    /// Waits up to `secs` for task `id` to reach `status` (None: gone);
    /// returns the last status seen.
    pub fn wait_for_task(&self, id: &str, status: Option<&str>, secs: u64) -> Option<String> {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let now = self.task_status(id);
            if now.as_deref() == status || Instant::now() > until {
                return now;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Asserts that nothing of Airlock's is left on the host: no VMM or
    /// shim process, no sandbox state, no mounts under containerd's dirs,
    /// no shim sockets.
    pub fn assert_nothing_left(&self) {
        let gone = || {
            crate::processes_mentioning("airlock-vmm").is_empty()
                && crate::processes_mentioning("containerd-shim-airlock-v2").is_empty()
                && std::fs::read_dir("/run/airlock").map_or(true, |mut d| d.next().is_none())
        };
        // Teardown wipes guest memory and scrubs the scratch disk: seconds
        // in the software-emulated test host, more when the machine is busy.
        let until = Instant::now() + Duration::from_secs(60);
        while !gone() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            crate::processes_mentioning("airlock-vmm"),
            Vec::<String>::new()
        );
        assert_eq!(
            crate::processes_mentioning("containerd-shim-airlock-v2"),
            Vec::<String>::new()
        );
        let entries = |dir: &str| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .collect()
        };
        // The log of a dead shim's cleanup stays for the operator.
        let state: Vec<PathBuf> = entries("/run/airlock")
            .into_iter()
            .filter(|p| !p.ends_with("shim-cleanup.log"))
            .collect();
        assert_eq!(state, Vec::<PathBuf>::new(), "sandbox state left");
        assert_eq!(
            entries("/run/containerd/s"),
            Vec::<PathBuf>::new(),
            "shim sockets left"
        );
        assert_eq!(self.mounts(), Vec::<String>::new(), "mounts left");
    }

    /// Mount points under this containerd's dirs.
    pub fn mounts(&self) -> Vec<String> {
        mounts_under(&self.dir)
    }
}

/// Mount points at or under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(String::from)
        .collect()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Shims outlive containerd by design: stop ours, then containerd.
        let address = self.socket().display().to_string();
        for cmdline in crate::processes_mentioning(&address) {
            if let Some(pid) = cmdline
                .split(' ')
                .next()
                .and_then(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill only reads its arguments.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        self.stop();
        for m in mounts_under(&self.dir).into_iter().rev() {
            let c = std::ffi::CString::new(m).unwrap_or_default();
            // SAFETY: umount2 reads the NUL-terminated path only.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        std::fs::remove_dir_all(&self.dir).ok();
    }
}
