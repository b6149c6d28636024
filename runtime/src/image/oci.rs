//! OCI images (an image layout directory, or a tarball of one as `ctr
//! images export` or `skopeo copy oci-archive:` write it) unpacked into a
//! directory: index → manifest (linux/amd64) → layers in order, with
//! whiteouts ([`layer`](super::layer)), every blob checked against its
//! digest.
//!
//! Layer blobs are streamed: hashed as they pass into the layer applier,
//! drained and compared at the end (the caller discards the root when that
//! fails). JSON blobs (index, manifest, config) are read whole, at most
//! [`MAX_JSON`] bytes. Every file of the layout is opened inside the layout
//! directory (`openat2(RESOLVE_IN_ROOT)`), regular files only: a layout
//! unpacked from a user's tarball cannot point a blob at a host file.
//!
//! The index and manifests are oci-spec's image types (unknown fields are
//! ignored). The config is read leniently: only its `config` section, also
//! oci-spec's, matters, and a config that does not parse gives no defaults
//! rather than an error.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Config, Descriptor, ImageIndex, ImageManifest, MediaType, Os};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::layer::{self, LayerError, Limits, Root, Unpacker};
use super::ImageConfig;

/// Largest index, manifest or config read.
pub const MAX_JSON: u64 = 4 << 20;

/// Docker's manifest list, an index by another name.
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Errors reading an OCI image; each names the image.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("corrupt OCI image {dir}: cannot read {file}")]
    Read {
        dir: PathBuf,
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("corrupt OCI image {dir}: {file} is larger than the limit of {limit} bytes")]
    TooLarge {
        dir: PathBuf,
        file: String,
        limit: u64,
    },
    #[error("corrupt OCI image {dir}: {file} is not valid")]
    Json {
        dir: PathBuf,
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("corrupt OCI image {dir}: unsupported digest {digest:?}")]
    Digest { dir: PathBuf, digest: String },
    #[error("corrupt OCI image {dir}: blob {digest} does not match its digest")]
    Mismatch { dir: PathBuf, digest: String },
    #[error("corrupt OCI image {0}: no linux/amd64 image in index.json")]
    NoPlatform(PathBuf),
    #[error("corrupt OCI image {0}: indexes nested too deep")]
    TooDeep(PathBuf),
    #[error("corrupt OCI image {dir}: layer {digest}")]
    Layer {
        dir: PathBuf,
        digest: String,
        #[source]
        source: LayerError,
    },
    #[error("corrupt OCI image {0}: cannot open the unpack root")]
    Root(PathBuf, #[source] LayerError),
    #[error("cannot open the image tarball {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("corrupt OCI image {0}: not an OCI image tarball")]
    Archive(PathBuf, #[source] LayerError),
    #[error("corrupt OCI image {0}: not an OCI image tarball: no index.json")]
    NoIndex(PathBuf),
}

/// The one part of an image config that is used.
#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<Config>,
}

/// An image layout, opened.
pub struct Layout {
    dir: PathBuf,
    /// The layout directory: every file of the layout is resolved in it.
    root: Root,
    /// The chosen manifest's digest: the image's identity.
    pub manifest_digest: String,
    manifest: ImageManifest,
}

impl Layout {
    /// Reads `index.json` and picks the linux/amd64 manifest.
    pub fn open(dir: &Path) -> Result<Self, OciError> {
        let root = Root::open(dir).map_err(|source| OciError::Read {
            dir: dir.to_path_buf(),
            file: ".".into(),
            source,
        })?;
        let mut file =
            root.open_file(Path::new("index.json"))
                .map_err(|source| OciError::Read {
                    dir: dir.to_path_buf(),
                    file: "index.json".into(),
                    source,
                })?;
        let data = read_capped(&mut file, dir, "index.json")?;
        let index: ImageIndex = parse(&data, dir, "index.json")?;
        let mut manifests = index.manifests().clone();
        for _ in 0..8 {
            let pick = pick(&manifests).ok_or_else(|| OciError::NoPlatform(dir.to_path_buf()))?;
            let digest = pick.digest().to_string();
            let blob = json_blob(&root, dir, &digest)?;
            if is_index(pick.media_type()) {
                let nested: ImageIndex = parse(&blob, dir, &digest)?;
                manifests = nested.manifests().clone();
                continue;
            }
            let manifest: ImageManifest = parse(&blob, dir, &format!("manifest {digest}"))?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                root,
                manifest_digest: digest,
                manifest,
            });
        }
        Err(OciError::TooDeep(dir.to_path_buf()))
    }

    /// The image's process defaults (none from a config that does not
    /// parse).
    pub fn config(&self) -> Result<ImageConfig, OciError> {
        let digest = self.manifest.config().digest().to_string();
        let data = json_blob(&self.root, &self.dir, &digest)?;
        let cfg: ConfigFile = serde_json::from_slice(&data).unwrap_or_default();
        let c = cfg.config.unwrap_or_default();
        Ok(ImageConfig {
            env: c.env().clone().unwrap_or_default(),
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().filter(|w| !w.is_empty()),
        })
    }

    /// Applies the layers, in order, to the empty directory `root`, within
    /// the default [`Limits`].
    pub fn unpack(&self, root: &Path) -> Result<(), OciError> {
        self.unpack_with(root, &Limits::default())
    }

    /// Applies the layers, in order, to the empty directory `root`. On an
    /// error `root` is half-applied: the caller discards it.
    pub fn unpack_with(&self, root: &Path, limits: &Limits) -> Result<(), OciError> {
        let mut unpacker =
            Unpacker::new(root, *limits).map_err(|e| OciError::Root(self.dir.clone(), e))?;
        for layer in self.manifest.layers() {
            let digest = layer.digest().to_string();
            let mut blob = Blob::open(&self.root, &self.dir, &digest)?;
            let applied = unpacker.apply(&mut blob);
            // A blob that is not what the manifest names explains any
            // error applying it.
            blob.verify(&self.dir)?;
            applied.map_err(|source| OciError::Layer {
                dir: self.dir.clone(),
                digest,
                source,
            })?;
        }
        Ok(())
    }
}

fn pick(manifests: &[Descriptor]) -> Option<&Descriptor> {
    manifests
        .iter()
        .find(|m| {
            m.platform()
                .as_ref()
                .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
        })
        .or_else(|| manifests.iter().find(|m| m.platform().is_none()))
}

/// An OCI index or a Docker manifest list.
fn is_index(media: &MediaType) -> bool {
    match media {
        MediaType::ImageIndex => true,
        MediaType::Other(m) => m == DOCKER_LIST,
        _ => false,
    }
}

fn parse<'a, T: Deserialize<'a>>(data: &'a [u8], dir: &Path, file: &str) -> Result<T, OciError> {
    serde_json::from_slice(data).map_err(|source| OciError::Json {
        dir: dir.to_path_buf(),
        file: file.to_string(),
        source,
    })
}

/// All of `r`, at most [`MAX_JSON`] bytes.
fn read_capped(r: &mut impl Read, dir: &Path, file: &str) -> Result<Vec<u8>, OciError> {
    let mut data = Vec::new();
    r.take(MAX_JSON.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|source| OciError::Read {
            dir: dir.to_path_buf(),
            file: file.to_string(),
            source,
        })?;
    if u64::try_from(data.len()).map_or(true, |n| n > MAX_JSON) {
        return Err(OciError::TooLarge {
            dir: dir.to_path_buf(),
            file: file.to_string(),
            limit: MAX_JSON,
        });
    }
    Ok(data)
}

/// A JSON blob, read whole (at most [`MAX_JSON`] bytes) and checked
/// against its digest.
fn json_blob(root: &Root, dir: &Path, digest: &str) -> Result<Vec<u8>, OciError> {
    let mut blob = Blob::open(root, dir, digest)?;
    let data = read_capped(&mut blob, dir, digest)?;
    blob.verify(dir)?;
    Ok(data)
}

/// A blob being read: hashed as it passes, checked against its digest by
/// [`Blob::verify`].
struct Blob {
    file: File,
    hasher: Sha256,
    digest: String,
    hex: String,
}

impl Blob {
    fn open(root: &Root, dir: &Path, digest: &str) -> Result<Self, OciError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| OciError::Digest {
                dir: dir.to_path_buf(),
                digest: digest.to_string(),
            })?
            .to_ascii_lowercase();
        let rel = Path::new("blobs/sha256").join(&hex);
        let file = root.open_file(&rel).map_err(|source| OciError::Read {
            dir: dir.to_path_buf(),
            file: rel.display().to_string(),
            source,
        })?;
        Ok(Self {
            file,
            hasher: Sha256::new(),
            digest: digest.to_string(),
            hex,
        })
    }

    /// Reads what is left and compares the digest.
    fn verify(mut self, dir: &Path) -> Result<(), OciError> {
        io::copy(&mut self, &mut io::sink()).map_err(|source| OciError::Read {
            dir: dir.to_path_buf(),
            file: self.digest.clone(),
            source,
        })?;
        if hex::encode(self.hasher.finalize()) != self.hex {
            return Err(OciError::Mismatch {
                dir: dir.to_path_buf(),
                digest: self.digest,
            });
        }
        Ok(())
    }
}

impl Read for Blob {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        Ok(n)
    }
}

/// Unpacks an image tarball (an archived layout) into `dir`, within the
/// default [`Limits`].
pub fn unpack_archive(archive: &Path, dir: &Path) -> Result<(), OciError> {
    unpack_archive_with(archive, dir, &Limits::default())
}

/// Unpacks an image tarball (an archived layout) into `dir`: streamed,
/// through the same confined applier as the layers (the user's tarball is
/// as untrusted as any layer; a layout has no `.wh.` names, so whiteouts
/// do nothing to a real one).
pub fn unpack_archive_with(archive: &Path, dir: &Path, limits: &Limits) -> Result<(), OciError> {
    let file = File::open(archive).map_err(|e| OciError::Open(archive.to_path_buf(), e))?;
    layer::apply(io::BufReader::new(file), dir, limits)
        .map_err(|e| OciError::Archive(archive.to_path_buf(), e))?;
    let index = Root::open(dir).and_then(|r| r.open_file(Path::new("index.json")));
    if index.is_err() {
        return Err(OciError::NoIndex(archive.to_path_buf()));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn oci_indexes_and_docker_lists_are_indexes() {
        assert!(is_index(&MediaType::from(
            "application/vnd.oci.image.index.v1+json"
        )));
        assert!(is_index(&MediaType::from(DOCKER_LIST)));
        assert!(!is_index(&MediaType::ImageManifest));
        assert!(!is_index(&MediaType::from(
            "application/vnd.docker.distribution.manifest.v2+json"
        )));
    }

    /// Writes a blob; returns its descriptor JSON.
    fn put(dir: &Path, media: &str, data: &[u8]) -> String {
        let hex = hex::encode(Sha256::digest(data));
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("blobs/sha256").join(&hex), data).unwrap();
        format!(
            r#"{{"mediaType":"{media}","digest":"sha256:{hex}","size":{}}}"#,
            data.len()
        )
    }

    fn layer(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, path, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    h.set_cksum();
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    /// A two-layer image layout; the second layer deletes a file with a
    /// whiteout. Returns the layout's dir.
    pub(crate) fn sample(dir: &Path) {
        let l1 = layer(&[
            ("./", None),
            ("bin/", None),
            ("bin/tool", Some(b"v1")),
            ("etc/", None),
            ("etc/old", Some(b"x")),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &l1).unwrap();
        let l1 = gz.finish().unwrap();
        let l2 = layer(&[("bin/tool", Some(b"v2")), ("etc/.wh.old", Some(b""))]);
        let d1 = put(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &l1);
        let d2 = put(dir, "application/vnd.oci.image.layer.v1.tar", &l2);
        let cfg = put(
            dir,
            "application/vnd.oci.image.config.v1+json",
            br#"{"config":{"Env":["PATH=/bin","LANG=C"],"Cmd":["tool"],"WorkingDir":"/bin"}}"#,
        );
        let manifest = format!(r#"{{"schemaVersion":2,"config":{cfg},"layers":[{d1},{d2}]}}"#);
        let m = put(
            dir,
            "application/vnd.oci.image.manifest.v1+json",
            manifest.as_bytes(),
        );
        let m = m.replace("}", r#","platform":{"architecture":"amd64","os":"linux"}}"#);
        std::fs::write(
            dir.join("index.json"),
            format!(r#"{{"schemaVersion":2,"manifests":[{m}]}}"#),
        )
        .unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        let layout = Layout::open(src.path()).unwrap();
        let root = tempfile::tempdir().unwrap();
        layout.unpack(root.path()).unwrap();
        assert_eq!(std::fs::read(root.path().join("bin/tool")).unwrap(), b"v2");
        assert!(!root.path().join("etc/old").exists(), "whiteout applied");
        assert!(root.path().join("etc").is_dir());
        let cfg = layout.config().unwrap();
        assert_eq!(cfg.cmd, vec!["tool".to_string()]);
        assert_eq!(cfg.working_dir.as_deref(), Some("/bin"));
    }

    #[test]
    fn a_corrupt_blob_is_refused() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        let layout = Layout::open(src.path()).unwrap();
        // Flip a byte of a layer blob.
        let blobs: Vec<_> = std::fs::read_dir(src.path().join("blobs/sha256"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        for b in &blobs {
            let mut data = std::fs::read(b).unwrap();
            if data.starts_with(&[0x1f, 0x8b]) {
                let n = data.len();
                data[n - 5] ^= 0xff;
                std::fs::write(b, data).unwrap();
            }
        }
        let root = tempfile::tempdir().unwrap();
        let err = layout.unpack(root.path()).unwrap_err().to_string();
        assert!(err.contains("does not match its digest"), "{err}");
    }

    #[test]
    fn entries_that_escape_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        // `append_data` refuses `..`; write the name into the header raw.
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let r = root.path().join("r");
        std::fs::create_dir(&r).unwrap();
        let err = layer::apply(&data[..], &r, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("would leave the root"), "{err}");
        assert!(!root.path().join("escape").exists());
    }

    #[test]
    fn a_tampered_uncompressed_layer_is_refused_once_streamed() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        let layout = Layout::open(src.path()).unwrap();
        for e in std::fs::read_dir(src.path().join("blobs/sha256")).unwrap() {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            if let Some(at) = data.windows(2).position(|w| w == b"v2") {
                let mut data = data;
                data[at + 1] = b'3';
                std::fs::write(&p, data).unwrap();
            }
        }
        let root = tempfile::tempdir().unwrap();
        let err = layout.unpack(root.path()).unwrap_err().to_string();
        assert!(err.contains("does not match its digest"), "{err}");
    }

    #[test]
    fn json_larger_than_the_limit_is_refused() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        let mut index = vec![b' '; 5 << 20];
        index.extend_from_slice(b"{}");
        std::fs::write(src.path().join("index.json"), index).unwrap();
        let err = Layout::open(src.path()).err().unwrap().to_string();
        assert!(
            err.ends_with("index.json is larger than the limit of 4194304 bytes"),
            "{err}"
        );
    }

    #[test]
    fn blobs_are_read_inside_the_layout_only() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        let layout = Layout::open(src.path()).unwrap();
        // A layer blob replaced by a symlink to the same bytes outside.
        let outside = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(src.path().join("blobs/sha256")).unwrap() {
            let p = e.unwrap().path();
            if std::fs::read(&p).unwrap().starts_with(&[0x1f, 0x8b]) {
                let copy = outside.path().join("blob");
                std::fs::rename(&p, &copy).unwrap();
                std::os::unix::fs::symlink(&copy, &p).unwrap();
            }
        }
        let root = tempfile::tempdir().unwrap();
        let err = layout.unpack(root.path()).unwrap_err();
        let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(msg.contains("cannot read blobs/sha256/"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    /// A tarball with `entries`, gzip'd or not.
    fn tarball(dir: &Path, gz: bool, entries: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        entries(&mut b);
        let mut data = b.into_inner().unwrap();
        if gz {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &data).unwrap();
            data = e.finish().unwrap();
        }
        let p = dir.join("image.tar");
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn image_tarballs_are_streamed_gzip_or_not() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        for gz in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let archive = tarball(tmp.path(), gz, |b| {
                b.append_dir_all(".", src.path()).unwrap();
            });
            let dir = tmp.path().join("layout");
            std::fs::create_dir(&dir).unwrap();
            unpack_archive(&archive, &dir).unwrap();
            let layout = Layout::open(&dir).unwrap();
            let root = tmp.path().join("root");
            std::fs::create_dir(&root).unwrap();
            layout.unpack(&root).unwrap();
            assert_eq!(std::fs::read(root.join("bin/tool")).unwrap(), b"v2");
            // Within limits, with a clear error.
            let small = Limits {
                entries: 3,
                ..Limits::default()
            };
            let again = tmp.path().join("again");
            std::fs::create_dir(&again).unwrap();
            let err = unpack_archive_with(&archive, &again, &small).unwrap_err();
            let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
            assert!(
                msg.contains(
                    "not an OCI image tarball: the image has more than the limit of 3 entries"
                ),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_hostile_image_tarball_stays_in_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let sentinel = tmp.path().join("sentinel");
        std::fs::create_dir(&sentinel).unwrap();
        std::fs::write(sentinel.join("file"), b"keep").unwrap();
        let header = || {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_mode(0o777);
            h
        };
        let link = |b: &mut tar::Builder<Vec<u8>>, path: &str, target: &Path| {
            let mut h = header();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, path, target).unwrap();
        };
        let file = |b: &mut tar::Builder<Vec<u8>>, path: &str| {
            let mut h = header();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(1);
            b.append_data(&mut h, path, &b"x"[..]).unwrap();
        };
        for gz in [false, true] {
            let archive = tarball(tmp.path(), gz, |b| {
                link(b, "blobs", &sentinel);
                file(b, "blobs/.wh.file");
                file(b, "blobs/.wh..wh..opq");
                link(b, "up", Path::new("../.."));
                file(b, "up/sentinel/file");
                file(b, "index.json");
            });
            let dir = tmp.path().join("work");
            std::fs::create_dir(&dir).unwrap();
            unpack_archive(&archive, &dir).unwrap();
            assert_eq!(std::fs::read(sentinel.join("file")).unwrap(), b"keep");
            assert_eq!(std::fs::read_dir(&sentinel).unwrap().count(), 1);
            assert_eq!(std::fs::read(dir.join("sentinel/file")).unwrap(), b"x");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
