//! Copying files into and out of a sandbox's container through the agent's
//! chunked file API (`ReadFile`/`WriteFile`/`Stat`).

use std::io::{Read, Write};
use std::path::Path;

use airlock_protocol::agent;

use super::{ctx, Sandbox, SandboxError, CONTAINER_ID};

/// Bytes per ReadFile/WriteFile call (ttrpc frames are at most 4 MiB).
const CHUNK: usize = 1 << 20;

impl Sandbox {
    /// Copies the local file `src` to `dst` in the container; returns the
    /// bytes copied. `dst` ending in `/` or naming a directory receives
    /// `src`'s file name.
    pub async fn copy_in(&self, src: &Path, dst: &str) -> Result<u64, SandboxError> {
        let meta = std::fs::metadata(src).map_err(|e| file_err(src, e))?;
        if !meta.is_file() {
            return Err(SandboxError::NotAFile(src.to_path_buf()));
        }
        let mut dst = dst.to_string();
        if dst.ends_with('/') || self.is_dir(&dst).await {
            let name = src
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            dst = format!("{}/{}", dst.trim_end_matches('/'), name);
        }
        self.write_file_from(CONTAINER_ID, src, &dst).await
    }

    /// Copies the local file `src` to exactly `dst` inside container
    /// `container_id` ("": the guest's own filesystem); returns the bytes
    /// copied.
    pub async fn write_file_from(
        &self,
        container_id: &str,
        src: &Path,
        dst: &str,
    ) -> Result<u64, SandboxError> {
        let meta = std::fs::metadata(src).map_err(|e| file_err(src, e))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        let mut file = std::fs::File::open(src).map_err(|e| file_err(src, e))?;
        let mut offset = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = read_full(&mut file, &mut buf).map_err(|e| file_err(src, e))?;
            let first = offset == 0;
            if n == 0 && !first {
                break;
            }
            let req = agent::WriteFileRequest {
                container_id: container_id.into(),
                path: dst.into(),
                offset,
                data: buf[..n].to_vec(),
                create: first,
                truncate: first,
                mode,
                ..Default::default()
            };
            self.call("WriteFile", |c| c.write_file(ctx(), &req))
                .await?;
            offset += n as u64;
            if n < CHUNK {
                break;
            }
        }
        Ok(offset)
    }

    /// Copies `src` in the container to the local path `dst` (a directory
    /// receives `src`'s file name); returns the bytes copied.
    pub async fn copy_out(&self, src: &str, dst: &Path) -> Result<u64, SandboxError> {
        let dst = if dst.is_dir() {
            dst.join(Path::new(src).file_name().unwrap_or_default())
        } else {
            dst.to_path_buf()
        };
        let tmp = dst.with_extension("airlock-partial");
        let result = async {
            let mut out = std::fs::File::create(&tmp).map_err(|e| file_err(&dst, e))?;
            let mut offset = 0u64;
            loop {
                let req = agent::ReadFileRequest {
                    container_id: CONTAINER_ID.into(),
                    path: src.into(),
                    offset,
                    len: CHUNK as u32,
                    ..Default::default()
                };
                let resp = self.call("ReadFile", |c| c.read_file(ctx(), &req)).await?;
                out.write_all(&resp.data).map_err(|e| file_err(&dst, e))?;
                offset += resp.data.len() as u64;
                if resp.eof || resp.data.is_empty() {
                    break;
                }
            }
            out.sync_all().map_err(|e| file_err(&dst, e))?;
            Ok(offset)
        }
        .await;
        match result {
            Ok(n) => {
                std::fs::rename(&tmp, &dst).map_err(|e| file_err(&dst, e))?;
                Ok(n)
            }
            Err(e) => {
                std::fs::remove_file(&tmp).ok();
                Err(e)
            }
        }
    }

    async fn is_dir(&self, path: &str) -> bool {
        let req = agent::StatRequest {
            container_id: CONTAINER_ID.into(),
            path: path.into(),
            follow_symlinks: true,
            ..Default::default()
        };
        match self.call("Stat", |c| c.stat(ctx(), &req)).await {
            Ok(resp) => resp.info.file_type.value() == agent::FileType::FILE_TYPE_DIRECTORY as i32,
            Err(_) => false,
        }
    }
}

/// A local file's error, naming it.
fn file_err(path: &Path, source: std::io::Error) -> SandboxError {
    SandboxError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
