//! What the commands share: config, logging, progress, error lines and
//! exit statuses.

use std::fmt::Display;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use airlock_protocol::agent::{ExecFailure, ExecFailureKind};
use airlock_runtime::config::{self, ConfigError, RuntimeConfig, MIN_MEMORY_MIB};
use airlock_runtime::image::ImageRef;
use airlock_runtime::net::NetOptions;
use airlock_runtime::sandbox::io::ProcessExit;
use airlock_runtime::sandbox::spec::{ImageDefaults, ProcessOptions};
use airlock_runtime::sandbox::{SandboxError, SandboxOptions};

/// airlock itself failed (docker's convention).
pub const EXIT_AIRLOCK: u8 = 125;
/// The command exists but cannot be run.
pub const EXIT_CANNOT_RUN: u8 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;
/// --timeout passed (timeout(1)'s convention).
pub const EXIT_TIMEOUT: u8 = 124;

pub fn init_logging(level: Option<&str>) {
    let level = level
        .map(str::to_string)
        .or_else(|| std::env::var("AIRLOCK_LOG").ok())
        // ttrpc warns about requests still pending when a connection is
        // dropped on purpose (e.g. after --timeout).
        .unwrap_or_else(|| "warn,ttrpc=error".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

pub fn load_config(path: Option<&Path>) -> Result<RuntimeConfig, String> {
    RuntimeConfig::load(path).map_err(|e| error_line(&e))
}

/// Prints `airlock: error: MSG` and returns status 125.
pub fn fail(msg: &dyn Display) -> ExitCode {
    eprintln!(
        "airlock: error: {}",
        airlock_report::flatten(&msg.to_string())
    );
    ExitCode::from(EXIT_AIRLOCK)
}

/// An error and its sources on one line.
pub fn error_line(err: &dyn std::error::Error) -> String {
    airlock_report::one_line(err)
}

/// Reports a failed sandbox operation. A command that could not be started
/// is reported the way runc reports it, with 126 or 127.
pub fn fail_sandbox(err: &SandboxError) -> ExitCode {
    if let SandboxError::Size(e) = err {
        if let Some(line) = size_flag_error(e) {
            return fail(&line);
        }
    }
    if let Some(failure) = err.exec_failure() {
        if let Some((line, status)) = cannot_run(failure) {
            eprintln!("{line}");
            return ExitCode::from(status);
        }
    }
    fail(&error_line(err))
}

/// A size the config's [limits] refused, as the flag that asked for it:
/// the config's own sizes are within its limits (checked at load), so what
/// was refused came from --cpus or --memory.
fn size_flag_error(e: &ConfigError) -> Option<String> {
    let flag = match e {
        ConfigError::NoVcpus => "--cpus 0".to_string(),
        ConfigError::TooManyVcpus { asked, .. } | ConfigError::VcpusOverVmm { asked } => {
            format!("--cpus {asked}")
        }
        ConfigError::TooLittleMemory { asked }
        | ConfigError::TooMuchMemory { asked, .. }
        | ConfigError::MoreThanHost { asked, .. } => format!("--memory {asked}"),
        _ => return None,
    };
    Some(format!("{flag}: {e}"))
}

/// The line and status runc gives a program that cannot be run: 127 when
/// it was not found, 126 when it is not executable.
fn cannot_run(failure: &ExecFailure) -> Option<(String, u8)> {
    let cmd = &failure.executable;
    match failure.kind_or_other() {
        ExecFailureKind::EXEC_FAILURE_KIND_NOT_FOUND => Some((
            format!("airlock: exec: \"{cmd}\": executable file not found in $PATH"),
            EXIT_NOT_FOUND,
        )),
        ExecFailureKind::EXEC_FAILURE_KIND_PERMISSION_DENIED => Some((
            format!("airlock: exec: \"{cmd}\": permission denied"),
            EXIT_CANNOT_RUN,
        )),
        ExecFailureKind::EXEC_FAILURE_KIND_OTHER => None,
    }
}

/// The exit status that mirrors the process's, with a note on stderr when
/// a signal or the OOM killer ended it.
pub fn exit_status(exit: ProcessExit) -> ExitCode {
    if exit.oom_killed {
        eprintln!("airlock: the command was killed: out of memory (the container's memory limit)");
    } else if exit.signal != 0 {
        tracing::info!(signal = exit.signal, "the command was killed by a signal");
    }
    ExitCode::from(u8::try_from(exit.status).unwrap_or(EXIT_AIRLOCK))
}

/// Progress lines on stderr, only when it is a terminal (scripts read
/// stderr as the command's own).
pub fn progress() -> impl FnMut(&str) {
    let show = std::io::stderr().is_terminal();
    move |msg: &str| {
        if show {
            eprintln!("airlock: {msg}…");
        }
    }
}

/// Sandbox sizing and image flags of `run` and `create`.
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxFlags {
    /// vCPUs of the microVM (default from the config: 1; at most its
    /// [limits] max_vcpus: 8)
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Memory of the microVM in MiB (default from the config: 256; at most
    /// its [limits] max_memory_mib: 8192)
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// Root filesystem from a directory (converted to a read-only ext4 image)
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    pub rootfs: Option<PathBuf>,
    /// Image: a name built by scripts/setup (default, python), an OCI image
    /// layout directory, or an OCI image tarball
    #[arg(long, value_name = "NAME|PATH")]
    pub image: Option<String>,
    /// OCI runtime spec (config.json) to start from: its limits, mounts,
    /// user and capabilities apply; the command line sets the process
    #[arg(long, value_name = "PATH")]
    pub spec: Option<PathBuf>,
    /// Network: none (no NIC, the default) or egress (outbound through NAT
    /// under the policy below; nothing from outside can connect in).
    /// Default from the config's [network] mode
    #[arg(long, value_name = "MODE")]
    pub net: Option<String>,
    /// Allow outbound traffic to a CIDR, IP, domain or *.domain, even if
    /// denied (repeatable; allow beats deny). Private, loopback,
    /// link-local, CGNAT and the host's own addresses are denied unless
    /// allowed here by address
    #[arg(long, value_name = "CIDR|IP|DOMAIN")]
    pub allow_out: Vec<String>,
    /// Deny outbound traffic to a CIDR or IP (repeatable); 0.0.0.0/0 with
    /// --allow-out DOMAIN allows that domain alone
    #[arg(long, value_name = "CIDR|IP")]
    pub deny_out: Vec<String>,
}

impl SandboxFlags {
    pub fn options(&self, config: &RuntimeConfig) -> Result<SandboxOptions, String> {
        let mut opts = SandboxOptions::from_config(config);
        opts.net = NetOptions::from_flags(
            &config.network,
            self.net.as_deref(),
            &self.allow_out,
            &self.deny_out,
        )
        .map_err(|e| error_line(&e))?;
        if let Some(c) = self.cpus {
            // validate() has bounded it by MAX_VCPUS (32).
            opts.vcpus = u8::try_from(c).unwrap_or(u8::MAX);
        }
        if let Some(m) = self.memory {
            opts.memory_mib = m;
        }
        if let Some(dir) = &self.rootfs {
            opts.image = ImageRef::Dir(dir.clone());
        } else if let Some(image) = &self.image {
            opts.image = ImageRef::parse(image);
        }
        Ok(opts)
    }

    /// Checks what can be checked without the config; the config's
    /// [limits] are checked as the sandbox is created
    /// ([`RuntimeConfig::check_vm_size`], reported by [`fail_sandbox`]).
    pub fn validate(&self) -> Result<Option<oci_spec::runtime::Spec>, String> {
        // The bounds that hold whatever the config says, checked where
        // the runtime checks them (unset flags pass).
        let vcpus = self.cpus.map_or(1, u64::from);
        let memory = self.memory.unwrap_or(MIN_MEMORY_MIB);
        if let Err(e) = config::check_size_bounds(vcpus, u64::from(memory)) {
            return Err(size_flag_error(&e).unwrap_or_else(|| e.to_string()));
        }
        if let Some(dir) = &self.rootfs {
            if !dir.is_dir() {
                return Err(format!("--rootfs {}: not a directory", dir.display()));
            }
        }
        match &self.spec {
            Some(p) => airlock_runtime::sandbox::spec::load(p)
                .map(Some)
                .map_err(|e| error_line(&e)),
            None => Ok(None),
        }
    }
}

/// Process flags of `run` and `exec`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProcessFlags {
    /// Set an environment variable in the command's environment
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory of the command
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Give the command a terminal (stderr then merges into stdout)
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Forward stdin to the command (else its stdin is empty)
    #[arg(short = 'i', long)]
    pub interactive: bool,
}

impl ProcessFlags {
    pub fn options(&self, args: Vec<String>) -> Result<ProcessOptions, String> {
        for kv in &self.env {
            if !kv.contains('=') || kv.starts_with('=') {
                return Err(format!("-e {kv}: use KEY=VALUE"));
            }
        }
        Ok(ProcessOptions {
            args,
            env: self.env.clone(),
            cwd: self.workdir.clone(),
            tty: self.tty,
        })
    }
}

/// The image's process defaults (for OCI images that carry a config).
pub fn image_defaults(resolved: Option<&airlock_runtime::image::ImageConfig>) -> ImageDefaults {
    match resolved {
        Some(c) => ImageDefaults {
            env: c.env.clone(),
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            working_dir: c.working_dir.clone(),
        },
        None => ImageDefaults::default(),
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught so that a sandbox is destroyed
/// rather than left running.
pub struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Interrupts {
    pub fn new() -> Result<Self, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let err = |e: std::io::Error| format!("cannot catch signals: {e}");
        Ok(Self {
            int: signal(SignalKind::interrupt()).map_err(err)?,
            term: signal(SignalKind::terminate()).map_err(err)?,
            hup: signal(SignalKind::hangup()).map_err(err)?,
        })
    }

    /// The next one's number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Reports an interruption; the status is 128 + the signal.
pub fn interrupted(sig: i32) -> ExitCode {
    eprintln!("airlock: interrupted by signal {sig}: destroying the sandbox");
    ExitCode::from(u8::try_from(128 + sig).unwrap_or(EXIT_AIRLOCK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_over_the_limits_name_the_flag() {
        let config = RuntimeConfig::default();
        let err = |v, m| size_flag_error(&config.check_vm_size(v, m).unwrap_err());
        assert_eq!(
            err(16, 256).as_deref(),
            Some("--cpus 16: 16 vCPUs is more than runtime config [limits] max_vcpus = 8")
        );
        assert_eq!(
            err(1, 9000).as_deref(),
            Some("--memory 9000: 9000 MiB of memory is more than runtime config [limits] max_memory_mib = 8192")
        );
        assert_eq!(size_flag_error(&ConfigError::Invalid("x".into())), None);
        // The bounds that hold whatever the config says.
        let bound = |v, m| size_flag_error(&config::check_size_bounds(v, m).unwrap_err());
        assert_eq!(
            err(0, 256).as_deref(),
            Some("--cpus 0: 0 vCPUs: a microVM needs at least 1")
        );
        assert_eq!(
            bound(33, 256).as_deref(),
            Some("--cpus 33: 33 vCPUs is more than the 32 a microVM can have")
        );
        assert_eq!(
            err(1, 63).as_deref(),
            Some("--memory 63: 63 MiB of memory is less than the 64 MiB a guest needs")
        );
        let huge = bound(1, u64::MAX / 2).unwrap();
        assert!(
            huge.contains("MiB of memory is more than this host's"),
            "{huge}"
        );
    }

    #[test]
    fn the_exec_failure_kind_gives_126_or_127() {
        let of = |kind| cannot_run(&ExecFailure::of(kind, "prog"));
        assert_eq!(
            of(ExecFailureKind::EXEC_FAILURE_KIND_NOT_FOUND),
            Some((
                "airlock: exec: \"prog\": executable file not found in $PATH".into(),
                EXIT_NOT_FOUND
            ))
        );
        assert_eq!(
            of(ExecFailureKind::EXEC_FAILURE_KIND_PERMISSION_DENIED),
            Some((
                "airlock: exec: \"prog\": permission denied".into(),
                EXIT_CANNOT_RUN
            ))
        );
        assert_eq!(of(ExecFailureKind::EXEC_FAILURE_KIND_OTHER), None);
    }
}
