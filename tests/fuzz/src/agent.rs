//! The agent's RPC handlers, called as its ttrpc server calls them: each
//! request's payload goes through the generated method handler
//! (`create_agent_service`), which decodes it as the agent does and calls
//! `airlock_agent::rpc::Service`, over a sandbox on a
//! `airlock_agent::machine::Fake`: a temporary directory standing for the
//! guest, where nothing is mounted and no process is launched (see the
//! agent's `machine/`). The file API works for real in the fake's root,
//! which is rebuilt for every input with a few files, directories,
//! symlinks that point out of it, and a FIFO.
//!
//! Input: up to [`MAX_REQUESTS`] requests, each a method byte, a
//! little-endian u16 length and that many payload bytes (fewer at the end).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock_agent::machine::Fake;
use airlock_agent::process::exits::Exits;
use airlock_agent::rpc::Service;
use airlock_agent::sandbox::Sandbox;
use airlock_protocol::agent_ttrpc::create_agent_service;
use ttrpc::r#async::TtrpcContext;

/// The methods, by the input's method byte (modulo their number).
pub const METHODS: &[&str] = &[
    "Check",
    "CreateSandbox",
    "DestroySandbox",
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "StatsContainer",
    "UpdateContainer",
    "ExecProcess",
    "WaitProcess",
    "SignalProcess",
    "ReadStdout",
    "ReadStderr",
    "WriteStdin",
    "CloseStdin",
    "TtyWinResize",
    "ReadFile",
    "WriteFile",
    "ListDir",
    "Stat",
    "MakeDir",
    "Remove",
    "ConfigureNetwork",
];

/// Requests one input may make.
pub const MAX_REQUESTS: usize = 16;

/// A handler that takes longer than this is a hang.
const DEADLINE: Duration = Duration::from_secs(5);

/// What one request got: its method and its status code, or `None` when
/// the payload did not decode (the server then answers with an error).
pub type Trace = Vec<(&'static str, Option<ttrpc::Code>)>;

/// The fuzz body.
pub fn agent_request(data: &[u8]) {
    agent_request_trace(data);
}

/// Runs the input's requests on a fresh sandbox and says what each got.
///
/// # Panics
/// When a handler runs past [`DEADLINE`], or a request leaves anything in
/// the fake's bundle or scratch directories (no container may get as far
/// as existing there).
pub fn agent_request_trace(data: &[u8]) -> Trace {
    let dir = DIR.with(|d| d.clone());
    fixture(&dir);
    let machine = Fake::new(&dir).expect("the fake guest's directories");
    let sandbox = Arc::new(Sandbox::with_machine(
        Arc::new(Exits::default()),
        Box::new(machine),
    ));
    let services = create_agent_service(Arc::new(Service::new(sandbox)));
    let (service_name, service) = services.iter().next().expect("the agent service");
    let mut trace = Trace::new();
    let mut rest = data;
    while trace.len() < MAX_REQUESTS {
        let Some((&method, tail)) = rest.split_first() else {
            break;
        };
        let (len, tail) = match tail {
            [a, b, tail @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), tail),
            _ => (0, &[][..]),
        };
        let (payload, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        let name = METHODS[usize::from(method) % METHODS.len()];
        let handler = service.methods.get(name).expect("a handler per method");
        let mut req = ttrpc::Request::new();
        req.service = service_name.clone();
        req.method = name.to_string();
        req.payload = payload.to_vec();
        let ctx = TtrpcContext {
            mh: ttrpc::MessageHeader::default(),
            metadata: HashMap::new(),
            timeout_nano: 0,
        };
        let res = RUNTIME
            .with(|rt| {
                rt.block_on(async {
                    tokio::time::timeout(DEADLINE, handler.handler(ctx, req)).await
                })
            })
            .unwrap_or_else(|_| panic!("{name} did not answer within {DEADLINE:?}"));
        let code = res.ok().map(|r| {
            r.status
                .as_ref()
                .map(|s| s.code.enum_value_or(ttrpc::Code::UNKNOWN))
                .unwrap_or(ttrpc::Code::OK)
        });
        trace.push((name, code));
        for sub in ["bundles", "scratch"] {
            let left: Vec<_> = std::fs::read_dir(dir.join(sub))
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "{name} left {left:?} behind");
        }
    }
    trace
}

thread_local! {
    // One of each per thread: cargo test runs the seed tests side by side.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    static DIR: PathBuf = tempfile::Builder::new()
        .prefix("airlock-fuzz-agent-")
        .tempdir()
        .expect("a temporary directory")
        // Kept for the life of the thread (a fuzzing run): rebuilt, not
        // made anew, for every input.
        .keep();
}

/// The fake guest's directory, emptied and filled again: in `root/`,
/// `etc/hostname`, `dir/sub/file`, symlinks to `/`, to `../../..` and to
/// themselves, and a FIFO.
fn fixture(dir: &Path) {
    for sub in ["root", "scratch", "bundles"] {
        let p = dir.join(sub);
        if p.exists() {
            make_removable(&p);
            std::fs::remove_dir_all(&p).expect("emptying the fake guest");
        }
    }
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc")).expect("fixture");
    std::fs::create_dir_all(root.join("dir/sub")).expect("fixture");
    std::fs::write(root.join("etc/hostname"), b"guest\n").expect("fixture");
    std::fs::write(root.join("dir/sub/file"), b"0123456789").expect("fixture");
    let links = [("up", "../../.."), ("abs", "/"), ("dir/loop", "loop")];
    for (link, target) in links {
        std::os::unix::fs::symlink(target, root.join(link)).expect("fixture");
    }
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("fixture");
}

/// A request may have made a directory without write or search
/// permission (MakeDir with mode 0): as root that does not matter, but
/// give them back so that the fixture can also be rebuilt as a user.
fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).ok();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            make_removable(&e.path());
        }
    }
}
