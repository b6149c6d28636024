//! What the guest gets of a container's rootfs. containerd hands the shim
//! a snapshot as mounts; the shim mounts it at `<bundle>/rootfs`, copies
//! it, and unmounts it again, so no host directory is ever shared with the
//! guest: the VM's first container gets an ext4 image (its `/dev/vda`),
//! a container joining a running VM gets a tar archive (sent through the
//! agent's file API; see ARCHITECTURE.md for the costs).

use std::path::{Path, PathBuf};

use airlock_runtime::image;
use containerd_shim::protos::api::Mount;

use crate::pod::{PodError, IMAGE_FILE};

/// The archive of a joining container's rootfs, in its bundle.
pub const ARCHIVE_FILE: &str = "airlock-rootfs.tar";

/// `<bundle>/airlock-rootfs.ext4` from the rootfs.
pub async fn build_image(bundle: &Path, mounts: &[Mount]) -> Result<PathBuf, PodError> {
    let out = bundle.join(IMAGE_FILE);
    let file = out.clone();
    with_rootfs(bundle, mounts, move |dir| {
        image::build_from_dir(dir, &file, &mut |m| log::info!("{m}")).map_err(|e| e.to_string())
    })
    .await?;
    Ok(out)
}

/// `<bundle>/airlock-rootfs.tar` from the rootfs: owners, modes, links and
/// device nodes as they are.
pub async fn build_archive(bundle: &Path, mounts: &[Mount]) -> Result<PathBuf, PodError> {
    let out = bundle.join(ARCHIVE_FILE);
    let file = out.clone();
    with_rootfs(bundle, mounts, move |dir| {
        let f = std::fs::File::create(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let mut tar = tar::Builder::new(std::io::BufWriter::new(f));
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        tar.append_dir_all(".", dir)
            .and_then(|()| tar.finish())
            .map_err(|e| format!("archiving {}: {e}", dir.display()))
    })
    .await?;
    Ok(out)
}

/// Runs `copy` on the mounted rootfs (off the async threads), then
/// unmounts it whatever happened.
async fn with_rootfs(
    bundle: &Path,
    mounts: &[Mount],
    copy: impl FnOnce(&Path) -> Result<(), String> + Send + 'static,
) -> Result<(), PodError> {
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs)
        .map_err(|e| PodError::Failed(format!("cannot make {}: {e}", rootfs.display())))?;
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, &rootfs).await {
            if i > 0 {
                unmount(&rootfs);
            }
            return Err(PodError::Failed(format!(
                "cannot mount the rootfs ({} {}) at {}: {e}",
                m.type_,
                m.source,
                rootfs.display()
            )));
        }
    }
    let dir = rootfs.clone();
    let copied = tokio::task::spawn_blocking(move || copy(&dir)).await;
    if !mounts.is_empty() {
        unmount(&rootfs);
    }
    match copied {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(PodError::Failed(e)),
        Err(e) => Err(PodError::Failed(format!("rootfs copy task failed: {e}"))),
    }
}

/// Unmounts `path` (lazily: a copy that failed may leave files open).
pub fn unmount(path: &Path) {
    if let Err(e) = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
            log::warn!("cannot unmount {}: {e}", path.display());
        }
    }
}
