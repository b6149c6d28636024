//! Per-sandbox state on the host: `<state_dir>/<id>/` (mode 0700) with the
//! sandbox record, the vsock socket, the scratch disk and the VMM's log.
//! Removed at teardown.

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const RECORD: &str = "sandbox.json";

/// Errors handling state dirs.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid sandbox ID {0:?}: IDs are 1-64 of [a-z0-9-]")]
    BadId(String),
    #[error("no sandbox {0}: `airlock ls` lists them")]
    NoSandbox(String),
    #[error("Cannot create the state dir {0}: {1}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("Cannot write {0}: {1}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("Cannot read {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("malformed sandbox record {0}: {1}")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("Cannot get random bytes from the kernel: {0}")]
    Random(#[source] getrandom::Error),
    #[error("Cannot remove the state dir {0}: {1}")]
    Remove(PathBuf, #[source] std::io::Error),
}

/// `bytes` random bytes from the kernel (getrandom(2)), as lowercase hex
/// (ids, names of temporary files).
pub fn try_random_hex(bytes: usize) -> Result<String, StateError> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(StateError::Random)?;
    Ok(hex::encode(b))
}

/// [`try_random_hex`] for callers that cannot go on without randomness:
/// panics with the kernel's error rather than returning a predictable id.
/// getrandom(2) fails only before the kernel's pool is seeded at early boot
/// or under a seccomp filter that denies it, neither the case for the CLI.
pub fn random_hex(bytes: usize) -> String {
    match try_random_hex(bytes) {
        Ok(h) => h,
        Err(e) => panic!("{e}"),
    }
}

/// A sandbox's ID; safe as a path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SandboxId(String);

impl SandboxId {
    /// 12 random hex digits.
    pub fn generate() -> Self {
        Self(random_hex(6))
    }

    /// Checks a user-given ID.
    pub fn parse(s: &str) -> Result<Self, StateError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(StateError::BadId(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `airlock ls` shows and teardown needs, in `sandbox.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub vmm_pid: u32,
    /// The VMM process's start time (field 22 of `/proc/PID/stat`: clock
    /// ticks after boot), read right after it was started: with the pid it
    /// names that one process, where a pid alone may have been reused.
    /// Records written before it was kept have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_start_time: Option<u64>,
    pub created_unix: u64,
    pub image: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub guest_cid: u32,
}

impl SandboxRecord {
    /// Whether process `vmm_pid` is still this sandbox's VMM: it started at
    /// the recorded time or, for a record without one, its command line is
    /// an airlock-vmm's that names this sandbox.
    pub fn is_own_vmm(&self) -> bool {
        match self.vmm_start_time {
            Some(t) => crate::procs::start_time(self.vmm_pid) == Some(t),
            None => std::fs::read(format!("/proc/{}/cmdline", self.vmm_pid)).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("airlock-vmm") && c.contains(&self.id)
            }),
        }
    }

    /// Whether its VMM process is alive (and is this sandbox's).
    pub fn is_running(&self) -> bool {
        self.is_own_vmm() && !crate::procs::exited(self.vmm_pid)
    }
}

/// One sandbox's state dir.
#[derive(Debug, Clone)]
pub struct StateDir {
    id: SandboxId,
    dir: PathBuf,
}

impl StateDir {
    /// Creates `<root>/<id>/` (0700; `root` 0711 if new).
    pub fn create(root: &Path, id: &SandboxId) -> Result<Self, StateError> {
        if !root.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(root)
                .map_err(|e| StateError::Create(root.to_path_buf(), e))?;
        }
        let dir = root.join(id.as_str());
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| StateError::Create(dir.clone(), e))?;
        // The umask may have narrowed it; make it exactly 0700.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| StateError::Create(dir.clone(), e))?;
        let root = dir.join("root");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .map_err(|e| StateError::Create(root, e))?;
        Ok(Self {
            id: id.clone(),
            dir,
        })
    }

    /// An existing sandbox's state dir.
    pub fn open(root: &Path, id: &SandboxId) -> Result<Self, StateError> {
        let dir = root.join(id.as_str());
        if !dir.is_dir() {
            return Err(StateError::NoSandbox(id.to_string()));
        }
        Ok(Self {
            id: id.clone(),
            dir,
        })
    }

    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The VMM's jail root: what the VMM sees as `/` (bind mounts of its
    /// files, and its vsock socket).
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The host end of the guest's vsock (hybrid vsock's Unix socket),
    /// inside the jail root so that the jailed VMM can create it.
    /// The VMM's vsock socket: in the state dir, which only root may
    /// change, not in the jail root, which the jailed VMM owns (the runtime
    /// binds it and hands the VMM the listening descriptor).
    pub fn vsock_uds(&self) -> PathBuf {
        self.path().join("vsock.sock")
    }

    pub fn scratch_path(&self) -> PathBuf {
        self.dir.join("scratch.ext4")
    }

    /// The VMM's log (JSON lines).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }

    /// The guest's serial console.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Writes the record atomically (temp file, then rename).
    pub fn write_record(&self, record: &SandboxRecord) -> Result<(), StateError> {
        let tmp = self.dir.join(".sandbox.json.tmp");
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| StateError::Write(tmp.clone(), e.into()))?;
        std::fs::write(&tmp, json).map_err(|e| StateError::Write(tmp.clone(), e))?;
        std::fs::rename(&tmp, self.dir.join(RECORD))
            .map_err(|e| StateError::Write(self.dir.join(RECORD), e))
    }

    pub fn read_record(&self) -> Result<SandboxRecord, StateError> {
        let p = self.dir.join(RECORD);
        let bytes = std::fs::read(&p).map_err(|e| StateError::Read(p.clone(), e))?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::Parse(p, e))
    }

    /// Deletes the dir and everything in it.
    pub fn remove(&self) -> Result<(), StateError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StateError::Remove(self.dir.clone(), e))
            }
            _ if self.dir.exists() => Err(StateError::Remove(
                self.dir.clone(),
                std::io::Error::other("still there"),
            )),
            _ => Ok(()),
        }
    }
}

/// Every sandbox under `root` that has a record, sorted by creation time.
pub fn list(root: &Path) -> Result<Vec<SandboxRecord>, StateError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StateError::Read(root.to_path_buf(), e)),
    };
    let mut out: Vec<SandboxRecord> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let id = SandboxId::parse(e.file_name().to_str()?).ok()?;
            StateDir::open(root, &id).ok()?.read_record().ok()
        })
        .collect();
    out.sort_by_key(|r| (r.created_unix, r.id.clone()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &SandboxId) -> SandboxRecord {
        SandboxRecord {
            id: id.to_string(),
            vmm_pid: std::process::id(),
            created_unix: 1,
            vmm_start_time: None,
            image: "default".into(),
            vcpus: 1,
            memory_mib: 256,
            guest_cid: 3,
        }
    }

    #[test]
    fn the_vmm_is_known_by_its_start_time() {
        let id = SandboxId::generate();
        let mut r = record(&id);
        let me = crate::procs::start_time(std::process::id()).unwrap();
        r.vmm_start_time = Some(me);
        assert!(r.is_own_vmm() && r.is_running());
        r.vmm_start_time = Some(me + 1);
        assert!(!r.is_own_vmm() && !r.is_running());
        // Without a start time, only an airlock-vmm naming the sandbox is
        // its VMM (this test process is not).
        r.vmm_start_time = None;
        assert!(!r.is_own_vmm());
    }

    #[test]
    fn records_without_a_start_time_still_parse() {
        let old = r#"{"id":"abc","vmm_pid":42,"created_unix":1,"image":"default",
            "vcpus":1,"memory_mib":256,"guest_cid":3}"#;
        let r: SandboxRecord = serde_json::from_str(old).unwrap();
        assert_eq!((r.vmm_pid, r.vmm_start_time), (42, None));
        let mut new = r.clone();
        new.vmm_start_time = Some(7);
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains("\"vmm_start_time\":7"), "{json}");
        assert_eq!(serde_json::from_str::<SandboxRecord>(&json).unwrap(), new);
    }

    #[test]
    fn ids() {
        let a = SandboxId::generate();
        assert_eq!(a.as_str().len(), 12);
        assert_ne!(a, SandboxId::generate());
        SandboxId::parse(a.as_str()).unwrap();
        for bad in ["", "..", "../x", "a/b", "A", "-x", &"a".repeat(65)] {
            assert!(SandboxId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lifecycle() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().join("state");
        let id = SandboxId::generate();
        let dir = StateDir::create(&root, &id).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(StateDir::create(&root, &id).is_err(), "exists");
        dir.write_record(&record(&id)).unwrap();
        assert_eq!(dir.read_record().unwrap(), record(&id));
        // This test process is not an airlock-vmm.
        assert!(!record(&id).is_running());
        assert_eq!(list(&root).unwrap(), vec![record(&id)]);
        std::fs::write(dir.scratch_path(), b"x").unwrap();
        dir.remove().unwrap();
        assert!(!dir.path().exists());
        assert!(list(&root).unwrap().is_empty());
        let err = StateDir::open(&root, &id).unwrap_err().to_string();
        assert_eq!(err, format!("no sandbox {id}: `airlock ls` lists them"));
    }
}
