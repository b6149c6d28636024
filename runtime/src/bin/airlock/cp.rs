//! `airlock cp`: copy a file into or out of a sandbox.

use std::path::Path;
use std::process::ExitCode;

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::sandbox::Sandbox;
use airlock_runtime::state::SandboxId;

use crate::common;

/// Copy a file between the host and a sandbox: `airlock cp FILE ID:/path`
/// or `airlock cp ID:/path FILE`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source: a local file, or ID:/path in a sandbox
    src: String,
    /// Destination: a local path, or ID:/path in a sandbox
    dst: String,
}

/// `ID:/path` → (ID, /path); anything else is local.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

pub async fn main(config: &RuntimeConfig, args: Args) -> ExitCode {
    let (id, inward, local, guest) = match (remote(&args.src), remote(&args.dst)) {
        (None, Some((id, path))) => (id, true, args.src.as_str(), path),
        (Some((id, path)), None) => (id, false, args.dst.as_str(), path),
        (Some(_), Some(_)) => {
            return common::fail(
                &"copying between two sandboxes is not supported: copy through the host",
            )
        }
        (None, None) => return common::fail(&"one side must be ID:/path (a sandbox path)"),
    };
    let id = match SandboxId::parse(id) {
        Ok(id) => id,
        Err(e) => return common::fail(&common::error_line(&e)),
    };
    let sandbox = match Sandbox::open(config, &id).await {
        Ok(s) => s,
        Err(e) => return common::fail_sandbox(&e),
    };
    let copied = if inward {
        sandbox.copy_in(Path::new(local), guest).await
    } else {
        sandbox.copy_out(guest, Path::new(local)).await
    };
    match copied {
        Ok(n) => {
            tracing::info!(bytes = n, "copied");
            ExitCode::SUCCESS
        }
        Err(e) => common::fail_sandbox(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::remote;

    #[test]
    fn sandbox_paths() {
        assert_eq!(remote("abc:/tmp/x"), Some(("abc", "/tmp/x")));
        assert_eq!(remote("/tmp/x"), None);
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("abc:relative"), None);
    }
}
