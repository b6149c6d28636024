//! Workload images: the root filesystem a sandbox's container runs on,
//! attached to the VM as a read-only ext4 disk.
//!
//! * a name: `<image_dir>/<name>.ext4`, built by `guest-image/images/build`
//!   (scripts/setup) from Debian packages;
//! * a directory: converted with `mkfs.ext4 -d` and cached under
//!   `<image_dir>/cache/<key>.ext4`, keyed by a hash of the tree's names,
//!   sizes, modes and mtimes, so an unchanged tree is converted once;
//! * an OCI image layout or tarball (`oci.rs`): unpacked and converted,
//!   cached by its manifest digest. Its layers are applied by `layer.rs`,
//!   which confines every entry to the unpack root, in a work directory
//!   only root can enter (the image's setuid files stay unreachable for
//!   other users of the host).

pub mod layer;
pub mod oci;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::RuntimeConfig;
use crate::scratch;

/// Errors resolving an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image \"{0}\": known images: {1} (built by scripts/setup into {2})")]
    Unknown(String, String, PathBuf),
    #[error("invalid image name {0:?}: use [a-z0-9._-]")]
    BadName(String),
    #[error("image path {0} does not exist")]
    NoPath(PathBuf),
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error("Cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("Cannot create {0}: {1}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("Cannot build the image for {0}: {1}")]
    Mkfs(PathBuf, #[source] scratch::ScratchError),
    #[error("Cannot name a work dir: {0}")]
    Random(#[from] crate::state::StateError),
}

/// Which image the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Named(String),
    Dir(PathBuf),
    OciLayout(PathBuf),
    OciArchive(PathBuf),
    /// A ready ext4 image, used as it is (the containerd shim builds one
    /// from each container's rootfs with [`build_from_dir`]).
    Ext4(PathBuf),
}

impl ImageRef {
    /// A name, or a path (anything with a `/`, or that exists).
    pub fn parse(arg: &str) -> Self {
        let p = Path::new(arg);
        if p.is_dir() {
            if p.join("oci-layout").is_file() {
                return ImageRef::OciLayout(p.to_path_buf());
            }
            return ImageRef::Dir(p.to_path_buf());
        }
        if p.is_file() || arg.contains('/') {
            return ImageRef::OciArchive(p.to_path_buf());
        }
        ImageRef::Named(arg.to_string())
    }
}

/// What an OCI image's config says about its process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
}

/// An image ready to attach.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The ext4 file.
    pub path: PathBuf,
    /// For `airlock ls`.
    pub name: String,
    /// The image's process defaults, if it has a config.
    pub config: Option<ImageConfig>,
}

/// Finds or builds the ext4 image for `image`.
pub fn resolve(
    image: &ImageRef,
    config: &RuntimeConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<ResolvedImage, ImageError> {
    match image {
        ImageRef::Named(name) => named(name, &config.image_dir),
        ImageRef::Dir(dir) => {
            if !dir.is_dir() {
                return Err(ImageError::NoPath(dir.clone()));
            }
            let path = from_dir(dir, &config.image_dir.join("cache"), progress)?;
            Ok(ResolvedImage {
                path,
                name: dir.display().to_string(),
                config: None,
            })
        }
        ImageRef::Ext4(p) => {
            if !p.is_file() {
                return Err(ImageError::NoPath(p.clone()));
            }
            Ok(ResolvedImage {
                path: p.clone(),
                name: p.display().to_string(),
                config: None,
            })
        }
        ImageRef::OciLayout(p) | ImageRef::OciArchive(p) => {
            if !p.exists() {
                return Err(ImageError::NoPath(p.clone()));
            }
            from_oci(image, p, &config.image_dir.join("cache"), progress)
        }
    }
}

fn named(name: &str, image_dir: &Path) -> Result<ResolvedImage, ImageError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        || name.starts_with('.')
    {
        return Err(ImageError::BadName(name.into()));
    }
    let path = image_dir.join(format!("{name}.ext4"));
    if !path.is_file() {
        let known = known_names(image_dir);
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        return Err(ImageError::Unknown(
            name.into(),
            known,
            image_dir.to_path_buf(),
        ));
    }
    Ok(ResolvedImage {
        path,
        name: name.into(),
        config: None,
    })
}

/// The names of the built images (`NAME.ext4` links, not their hashed
/// targets `NAME-KEY.ext4`).
pub fn known_names(image_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(image_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_type()
                        .map(|t| t.is_symlink() || t.is_file())
                        .unwrap_or(false)
                })
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_suffix(".ext4")
                        .map(str::to_string)
                })
                .filter(|n| !n.contains('-'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Unpacks an OCI image (layout or tarball) and converts it, cached by its
/// manifest digest.
fn from_oci(
    image: &ImageRef,
    path: &Path,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<ResolvedImage, ImageError> {
    std::fs::create_dir_all(cache).map_err(|e| ImageError::Create(cache.into(), e))?;
    let work = tempfile_dir(cache)?;
    let result = (|| {
        let layout_dir = match image {
            ImageRef::OciArchive(_) => {
                progress(&format!("unpacking {}", path.display()));
                let d = work.join("layout");
                private_dir(&d)?;
                oci::unpack_archive(path, &d)?;
                d
            }
            _ => path.to_path_buf(),
        };
        let layout = oci::Layout::open(&layout_dir)?;
        let config = layout.config()?;
        let key = layout
            .manifest_digest
            .trim_start_matches("sha256:")
            .chars()
            .take(32)
            .collect::<String>();
        let out = cache.join(format!("oci-{key}.ext4"));
        if !out.is_file() {
            progress(&format!("unpacking the layers of {}", path.display()));
            // 0755 as before: mkfs.ext4 -d may take the image's `/` mode
            // from it; the private work dir above keeps others out.
            let root = work.join("rootfs");
            std::fs::create_dir(&root).map_err(|e| ImageError::Create(root.clone(), e))?;
            layout.unpack(&root)?;
            let (_, bytes, inodes) = tree_key(&root)?;
            build_ext4(&root, &out, bytes, inodes, progress)?;
        }
        Ok(ResolvedImage {
            path: out,
            name: path.display().to_string(),
            config: Some(config),
        })
    })();
    std::fs::remove_dir_all(&work).ok();
    result
}

/// A fresh private work dir under `cache`.
fn tempfile_dir(cache: &Path) -> Result<PathBuf, ImageError> {
    let d = cache.join(format!(".work-{}", crate::state::try_random_hex(8)?));
    private_dir(&d)?;
    Ok(d)
}

/// A new directory only its owner (root) can enter: an unpacked image may
/// hold setuid files, which no other user of the host may reach.
fn private_dir(d: &Path) -> Result<(), ImageError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(d)
        .map_err(|e| ImageError::Create(d.to_path_buf(), e))
}

/// Converts `dir` to an ext4 image in `cache` (reused while the tree is
/// unchanged).
pub fn from_dir(
    dir: &Path,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, ImageError> {
    let (key, bytes, inodes) = tree_key(dir)?;
    let out = cache.join(format!("{key}.ext4"));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache).map_err(|e| ImageError::Create(cache.into(), e))?;
    build_ext4(dir, &out, bytes, inodes, progress)?;
    Ok(out)
}

/// Converts `dir` to the ext4 image `out` (no cache: the caller owns it).
pub fn build_from_dir(
    dir: &Path,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let (_, bytes, inodes) = tree_key(dir)?;
    build_ext4(dir, out, bytes, inodes, progress)
}

/// `mkfs.ext4 -d dir` into `out`, through a temporary file.
fn build_ext4(
    dir: &Path,
    out: &Path,
    bytes: u64,
    inodes: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    // Room for the files, their inodes and ext4's own metadata.
    let size = (bytes + inodes * 4096) * 5 / 4 + (32 << 20);
    progress(&format!(
        "converting {} to an ext4 image ({} MiB)",
        dir.display(),
        size >> 20
    ));
    let tmp = out.with_extension(format!("{}.tmp", std::process::id()));
    let built = (|| {
        let create = |e| ImageError::Create(tmp.clone(), e);
        let f = std::fs::File::create(&tmp).map_err(create)?;
        f.set_len(size).map_err(create)?;
        drop(f);
        let d = dir.to_string_lossy().into_owned();
        scratch::mkfs(&tmp, &["-d", &d, "-E", "root_owner=0:0"])
            .map_err(|e| ImageError::Mkfs(dir.into(), e))?;
        std::fs::rename(&tmp, out).map_err(|e| ImageError::Create(out.into(), e))
    })();
    if built.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    built
}

/// A SHA-256 of the tree (names, types, sizes, modes, mtimes, owners, link
/// targets), as 32 hex digits, with its bytes (block-rounded) and its inode
/// count. The key is stable across Rust releases (std's `DefaultHasher` was
/// not); entries cached under the older 16-digit keys simply miss and are
/// rebuilt once.
fn tree_key(dir: &Path) -> Result<(String, u64, u64), ImageError> {
    let mut h = Sha256::new();
    field(&mut h, dir.as_os_str().as_bytes());
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map_err(|e| ImageError::Read(d.clone(), e))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let m =
                std::fs::symlink_metadata(&p).map_err(|err| ImageError::Read(p.clone(), err))?;
            field(
                &mut h,
                p.strip_prefix(dir).unwrap_or(&p).as_os_str().as_bytes(),
            );
            for n in [
                u64::from(m.mode()),
                m.size(),
                m.mtime() as u64,
                m.mtime_nsec() as u64,
                u64::from(m.uid()),
                u64::from(m.gid()),
            ] {
                h.update(n.to_le_bytes());
            }
            if m.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap_or_default();
                field(&mut h, target.as_os_str().as_bytes());
            }
            inodes += 1;
            bytes += m.size().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    let digest = h.finalize();
    Ok((hex::encode(&digest[..16]), bytes, inodes))
}

/// Feeds `b` with its length first, so that no two trees run together.
fn field(h: &mut Sha256, b: &[u8]) {
    h.update((b.len() as u64).to_le_bytes());
    h.update(b);
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn debugfs_ls(img: &Path, dir: &str) -> String {
        let out = Command::new("debugfs")
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
            .args(["-R", &format!("ls -l {dir}")])
            .arg(img)
            .output()
            .expect("debugfs (e2fsprogs)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn a_directory_becomes_a_cached_ext4() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("bin")).unwrap();
        std::fs::write(src.path().join("bin/tool"), vec![7u8; 100_000]).unwrap();
        std::os::unix::fs::symlink("bin/tool", src.path().join("link")).unwrap();
        let mut said = Vec::new();
        let img = from_dir(src.path(), cache.path(), &mut |m| said.push(m.to_string())).unwrap();
        assert_eq!(said.len(), 1, "progress for the conversion");
        let listing = debugfs_ls(&img, "/bin");
        assert!(
            listing.contains("tool") && listing.contains("100000"),
            "{listing}"
        );
        assert!(debugfs_ls(&img, "/").contains("link"));

        // Unchanged: the same file, no conversion.
        let again = from_dir(src.path(), cache.path(), &mut |m| said.push(m.to_string())).unwrap();
        assert_eq!(again, img);
        assert_eq!(said.len(), 1);
        // Changed: a new image.
        std::fs::write(src.path().join("new"), b"x").unwrap();
        assert_ne!(
            from_dir(src.path(), cache.path(), &mut |_| {}).unwrap(),
            img
        );
        let leftovers = std::fs::read_dir(cache.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn work_dirs_are_private() {
        let cache = tempfile::tempdir().unwrap();
        let work = tempfile_dir(cache.path()).unwrap();
        assert_eq!(std::fs::metadata(&work).unwrap().mode() & 0o777, 0o700);
        assert!(work.starts_with(cache.path()));
    }

    #[test]
    fn names_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("default-0123.ext4"), b"").unwrap();
        std::os::unix::fs::symlink("default-0123.ext4", dir.path().join("default.ext4")).unwrap();
        assert_eq!(known_names(dir.path()), vec!["default".to_string()]);
        let r = named("default", dir.path()).unwrap();
        assert_eq!(r.path, dir.path().join("default.ext4"));
        let err = named("python2", dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("unknown image \"python2\": known images: default"),
            "{err}"
        );
        assert!(matches!(
            named("../x", dir.path()),
            Err(ImageError::BadName(_))
        ));
        assert_eq!(ImageRef::parse("python"), ImageRef::Named("python".into()));
        assert_eq!(
            ImageRef::parse(dir.path().to_str().unwrap()),
            ImageRef::Dir(dir.path().into())
        );
        assert!(matches!(
            ImageRef::parse("./no/such.tar"),
            ImageRef::OciArchive(_)
        ));
    }

    #[test]
    fn oci_layouts_and_tarballs_become_cached_images() {
        let src = tempfile::tempdir().unwrap();
        oci::tests::sample(src.path());
        assert_eq!(
            ImageRef::parse(src.path().to_str().unwrap()),
            ImageRef::OciLayout(src.path().into())
        );
        let images = tempfile::tempdir().unwrap();
        let config = RuntimeConfig {
            image_dir: images.path().to_path_buf(),
            ..Default::default()
        };
        let r = resolve(
            &ImageRef::OciLayout(src.path().into()),
            &config,
            &mut |_| {},
        )
        .unwrap();
        assert!(debugfs_ls(&r.path, "/bin").contains("tool"));
        assert_eq!(r.config.as_ref().unwrap().cmd, vec!["tool".to_string()]);

        // The same image as a tarball: same manifest, same cached file.
        let tarball = tempfile::tempdir().unwrap();
        let tar_path = tarball.path().join("image.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
        b.append_dir_all(".", src.path()).unwrap();
        b.finish().unwrap();
        drop(b);
        let r2 = resolve(
            &ImageRef::parse(tar_path.to_str().unwrap()),
            &config,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(r2.path, r.path);
        let leftovers: Vec<_> = std::fs::read_dir(images.path().join("cache"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| {
                n.to_string_lossy().starts_with('.') || n.to_string_lossy().ends_with(".tmp")
            })
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // Not a tarball at all.
        let junk = tarball.path().join("junk.tar");
        std::fs::write(&junk, b"not a tar").unwrap();
        let err = resolve(&ImageRef::OciArchive(junk), &config, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("corrupt OCI image"), "{err}");
    }
}
