//! What the shim keeps in a container's bundle: the [`SandboxFile`] that
//! finds a dead shim's VM, the rootfs image or archive, and the `address`
//! of the shim's socket; and their removal.

use std::path::{Path, PathBuf};

use crate::rootfs;

/// What `delete` needs after a dead shim to tear down the VM that a
/// bundle's container booted ([`SandboxFile`]).
pub const SANDBOX_FILE: &str = "airlock-sandbox";

/// The content of [`SANDBOX_FILE`]: JSON `{"id": ..., "config_path": ...}`
/// (older shims wrote the bare id).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxFile {
    /// The sandbox id of the VM.
    pub id: String,
    /// The runtime config Create used (its `ConfigPath`): where the VM's
    /// state is (`state_dir`) and how long its stop may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_path: Option<PathBuf>,
}

impl SandboxFile {
    /// Writes it into `bundle`, whole or not at all (temp file, rename).
    pub fn write(&self, bundle: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self)?;
        let tmp = bundle.join(format!(".{SANDBOX_FILE}.tmp"));
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, bundle.join(SANDBOX_FILE)).inspect_err(|_| {
            std::fs::remove_file(&tmp).ok();
        })
    }

    /// Reads `bundle`'s; `None` if it has none (no VM was booted for it).
    pub fn read(bundle: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read_to_string(bundle.join(SANDBOX_FILE)) {
            Ok(text) => Self::parse(&text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn parse(text: &str) -> std::io::Result<Self> {
        let text = text.trim();
        if text.starts_with('{') {
            return serde_json::from_str(text).map_err(std::io::Error::from);
        }
        Ok(Self {
            id: text.to_string(),
            config_path: None,
        })
    }
}

/// Removes what the shim put in a bundle (containerd removes the rest).
pub fn cleanup_bundle(bundle: &Path) {
    rootfs::unmount(&bundle.join("rootfs"));
    std::fs::remove_file(bundle.join(rootfs::IMAGE_FILE)).ok();
    std::fs::remove_file(bundle.join(rootfs::ARCHIVE_FILE)).ok();
    std::fs::remove_file(bundle.join(SANDBOX_FILE)).ok();
}

/// Removes the shim socket named in `bundle`'s `address` file (written by
/// `start`; containerd's `unix:///run/containerd/s/<hash>`), if it is a
/// socket. With `if_unserved`, only when no shim answers on it.
pub fn remove_socket(bundle: &Path, if_unserved: bool) {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return;
    };
    let path = address.trim().trim_start_matches("unix://");
    if if_unserved && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            std::fs::remove_file(path).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn the_sandbox_file_keeps_the_id_and_the_config_path() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SandboxFile::read(dir.path()).unwrap(), None);
        let f = SandboxFile {
            id: "0123456789ab".into(),
            config_path: Some("/etc/airlock/pods.toml".into()),
        };
        f.write(dir.path()).unwrap();
        assert_eq!(SandboxFile::read(dir.path()).unwrap(), Some(f));
        let text = std::fs::read_to_string(dir.path().join(SANDBOX_FILE)).unwrap();
        assert_eq!(
            text,
            r#"{"id":"0123456789ab","config_path":"/etc/airlock/pods.toml"}"#
        );
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let defaults = SandboxFile {
            id: "0123456789ab".into(),
            config_path: None,
        };
        defaults.write(dir.path()).unwrap();
        assert_eq!(SandboxFile::read(dir.path()).unwrap(), Some(defaults));
    }

    #[test]
    fn an_older_shims_bare_id_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SANDBOX_FILE), "0123456789ab").unwrap();
        assert_eq!(
            SandboxFile::read(dir.path()).unwrap(),
            Some(SandboxFile {
                id: "0123456789ab".into(),
                config_path: None
            })
        );
    }

    #[test]
    fn a_sandbox_file_that_cannot_be_written_or_read_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = SandboxFile {
            id: "0123456789ab".into(),
            config_path: None,
        };
        assert!(f.write(&dir.path().join("no-such-bundle")).is_err());
        std::fs::write(dir.path().join(SANDBOX_FILE), "{\"id\": ").unwrap();
        assert!(SandboxFile::read(dir.path()).is_err());
    }

    #[test]
    fn socket_removal_follows_the_address_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let address = |p: &Path| {
            std::fs::write(
                dir.path().join("address"),
                format!("unix://{}\n", p.display()),
            )
            .unwrap()
        };
        address(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        // Served: kept when asked to spare a live shim's socket.
        remove_socket(dir.path(), true);
        assert!(sock.exists());
        // The serving shim removes its own.
        remove_socket(dir.path(), false);
        assert!(!sock.exists());
        drop(listener);
        // Never a file that is not a socket.
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        address(&file);
        remove_socket(dir.path(), false);
        assert!(file.exists());
        // No address file: nothing to do.
        remove_socket(&dir.path().join("missing"), false);
    }
}
