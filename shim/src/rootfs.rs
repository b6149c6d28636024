//! What the guest gets of a container's rootfs. containerd hands the shim
//! a snapshot as mounts; the shim mounts it at `<bundle>/rootfs`, copies
//! it, and unmounts it again, so no host directory is ever shared with the
//! guest: the VM's first container gets an ext4 image (its `/dev/vda`),
//! a container joining a running VM gets a tar archive (sent through the
//! agent's file API; see ARCHITECTURE.md for the costs).

use std::path::{Path, PathBuf};

use airlock_runtime::image;
use containerd_shim::protos::api::Mount;

/// The image built from a container's rootfs, in its bundle.
pub const IMAGE_FILE: &str = "airlock-rootfs.ext4";
/// The archive of a joining container's rootfs, in its bundle.
pub const ARCHIVE_FILE: &str = "airlock-rootfs.tar";

/// Errors making the guest's copy of a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot make {}: {source}", .dir.display())]
    MakeDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount the rootfs ({kind} {from}) at {}: {source}", .at.display())]
    Mount {
        kind: String,
        from: String,
        at: PathBuf,
        #[source]
        source: Box<containerd_shim::Error>,
    },
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("{}: {source}", .file.display())]
    Create {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("archiving {}: {source}", .dir.display())]
    Archive {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rootfs copy task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// `<bundle>/airlock-rootfs.ext4` from the rootfs.
pub async fn build_image(bundle: &Path, mounts: &[Mount]) -> Result<PathBuf, RootfsError> {
    let out = bundle.join(IMAGE_FILE);
    let file = out.clone();
    with_rootfs(bundle, mounts, move |dir| {
        image::build_from_dir(dir, &file, &mut |m| tracing::info!("{m}")).map_err(Into::into)
    })
    .await?;
    Ok(out)
}

/// `<bundle>/airlock-rootfs.tar` from the rootfs: owners, modes, links and
/// device nodes as they are.
pub async fn build_archive(bundle: &Path, mounts: &[Mount]) -> Result<PathBuf, RootfsError> {
    let out = bundle.join(ARCHIVE_FILE);
    let file = out.clone();
    with_rootfs(bundle, mounts, move |dir| {
        let f = std::fs::File::create(&file).map_err(|e| RootfsError::Create {
            file: file.clone(),
            source: e,
        })?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(f));
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        tar.append_dir_all(".", dir)
            .and_then(|()| tar.finish())
            .map_err(|e| RootfsError::Archive {
                dir: dir.to_path_buf(),
                source: e,
            })
    })
    .await?;
    Ok(out)
}

/// Runs `copy` on the mounted rootfs (off the async threads), then
/// unmounts it whatever happened.
async fn with_rootfs(
    bundle: &Path,
    mounts: &[Mount],
    copy: impl FnOnce(&Path) -> Result<(), RootfsError> + Send + 'static,
) -> Result<(), RootfsError> {
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| RootfsError::MakeDir {
        dir: rootfs.clone(),
        source: e,
    })?;
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, &rootfs).await {
            if i > 0 {
                unmount(&rootfs);
            }
            return Err(RootfsError::Mount {
                kind: m.type_.clone(),
                from: m.source.clone(),
                at: rootfs,
                source: Box::new(e),
            });
        }
    }
    let dir = rootfs.clone();
    let copied = tokio::task::spawn_blocking(move || copy(&dir)).await;
    if !mounts.is_empty() {
        unmount(&rootfs);
    }
    match copied {
        Ok(r) => r,
        Err(e) => Err(RootfsError::Task(e)),
    }
}

/// Unmounts `path` (lazily: a copy that failed may leave files open).
pub fn unmount(path: &Path) {
    if let Err(e) = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
            tracing::warn!("cannot unmount {}: {e}", path.display());
        }
    }
}
