//! OCI images (an image layout directory, or a tarball of one as `ctr
//! images export` or `skopeo copy oci-archive:` write it) unpacked into a
//! directory: index → manifest (linux/amd64) → layers in order, with
//! whiteouts, every blob checked against its digest.
//!
//! The JSON is read with serde_json rather than oci-spec's image types:
//! only five fields are needed, and unknown fields must not fail.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{ImageConfig, ImageError};

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ConfigSection>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ConfigSection {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
}

/// An image layout, opened.
pub struct Layout {
    dir: PathBuf,
    /// The chosen manifest's digest: the image's identity.
    pub manifest_digest: String,
    manifest: Manifest,
}

fn corrupt(dir: &Path, why: impl std::fmt::Display) -> ImageError {
    ImageError::Corrupt(dir.to_path_buf(), why.to_string())
}

impl Layout {
    /// Reads `index.json` and picks the linux/amd64 manifest.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let index: Index = serde_json::from_slice(&read(dir, &dir.join("index.json"))?)
            .map_err(|e| corrupt(dir, format!("index.json: {e}")))?;
        let mut manifests = index.manifests;
        for _ in 0..8 {
            let pick = pick(&manifests)
                .ok_or_else(|| corrupt(dir, "no linux/amd64 image in index.json"))?;
            let blob = blob(dir, &pick.digest)?;
            if INDEX_TYPES.contains(&pick.media_type.as_str()) {
                let nested: Index = serde_json::from_slice(&blob)
                    .map_err(|e| corrupt(dir, format!("{}: {e}", pick.digest)))?;
                manifests = nested.manifests;
                continue;
            }
            let manifest: Manifest = serde_json::from_slice(&blob)
                .map_err(|e| corrupt(dir, format!("manifest {}: {e}", pick.digest)))?;
            return Ok(Self {
                dir: dir.to_path_buf(),
                manifest_digest: pick.digest.clone(),
                manifest,
            });
        }
        Err(corrupt(dir, "indexes nested too deep"))
    }

    /// The image's process defaults.
    pub fn config(&self) -> Result<ImageConfig, ImageError> {
        let cfg: ConfigFile =
            serde_json::from_slice(&blob(&self.dir, &self.manifest.config.digest)?)
                .unwrap_or_default();
        let c = cfg.config.unwrap_or_default();
        Ok(ImageConfig {
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            working_dir: c.working_dir.filter(|w| !w.is_empty()),
        })
    }

    /// Applies the layers, in order, to the empty directory `root`.
    pub fn unpack(&self, root: &Path) -> Result<(), ImageError> {
        for layer in &self.manifest.layers {
            let data = blob(&self.dir, &layer.digest)?;
            apply_layer(&data, root).map_err(|e| {
                // tar wraps the cause; name it too.
                let cause = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_else(|| format!(" ({e:?})"));
                corrupt(&self.dir, format!("layer {}: {e}{cause}", layer.digest))
            })?;
        }
        Ok(())
    }
}

fn pick(manifests: &[Descriptor]) -> Option<&Descriptor> {
    manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .or_else(|| manifests.iter().find(|m| m.platform.is_none()))
}

fn read(dir: &Path, p: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(p).map_err(|e| {
        corrupt(
            dir,
            format!("{}: {e}", p.strip_prefix(dir).unwrap_or(p).display()),
        )
    })
}

/// A blob, checked against its digest.
fn blob(dir: &Path, digest: &str) -> Result<Vec<u8>, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| corrupt(dir, format!("unsupported digest {digest:?}")))?;
    let data = read(dir, &dir.join("blobs/sha256").join(hex))?;
    let got = Sha256::digest(&data);
    if hex_string(&got) != hex.to_ascii_lowercase() {
        return Err(corrupt(
            dir,
            format!("blob {digest} does not match its digest"),
        ));
    }
    Ok(data)
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Applies one layer (tar, gzip'd or not) with OCI whiteouts.
fn apply_layer(data: &[u8], root: &Path) -> std::io::Result<()> {
    let reader: Box<dyn Read> = if data.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(data))
    } else {
        Box::new(data)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Some(rel) = safe_relative(&path)? else {
            continue; // the root itself ("./")
        };
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent = root.join(rel.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            if let Ok(children) = std::fs::read_dir(&parent) {
                for c in children.flatten() {
                    remove(&c.path())?;
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            remove(&parent.join(hidden))?;
            continue;
        }
        let target = root.join(&rel);
        // A file replacing a directory (or the reverse) from a lower layer.
        if let Ok(old) = std::fs::symlink_metadata(&target) {
            if old.is_dir() != entry.header().entry_type().is_dir() {
                remove(&target)?;
            }
        }
        // unpack_in refuses paths that leave `root`, also through symlinks
        // planted by earlier entries.
        if !entry.unpack_in(root)? {
            return Err(std::io::Error::other(format!(
                "entry {} escapes the root",
                path.display()
            )));
        }
    }
    Ok(())
}

fn remove(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `path` without leading `/` or `./` (`None` for the root itself); an
/// error if it has `..`.
fn safe_relative(path: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(std::io::Error::other(format!(
                    "entry {} escapes the root",
                    path.display()
                )))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Unpacks an image tarball (an archived layout) into `dir`.
pub fn unpack_archive(archive: &Path, dir: &Path) -> Result<(), ImageError> {
    let data = std::fs::read(archive).map_err(|e| ImageError::Read(archive.to_path_buf(), e))?;
    let reader: Box<dyn Read> = if data.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(&data[..]))
    } else {
        Box::new(&data[..])
    };
    let mut tar = tar::Archive::new(reader);
    tar.unpack(dir)
        .map_err(|e| corrupt(archive, format!("not an OCI image tarball: {e}")))?;
    if !dir.join("index.json").is_file() {
        return Err(corrupt(archive, "not an OCI image tarball: no index.json"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a blob; returns its descriptor JSON.
    fn put(dir: &Path, media: &str, data: &[u8]) -> String {
        let hex = hex_string(&Sha256::digest(data));
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
        let err = apply_layer(&data, &root.path().join("r"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("escapes the root"), "{err}");
        assert!(!root.path().join("escape").exists());
    }
}
