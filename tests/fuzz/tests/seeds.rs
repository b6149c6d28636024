//! The seeds of the targets that drive a device through its life reach
//! what they are meant to: these are the evidence that the fuzzer starts
//! from established vsock connections, requests served by virtio-blk's
//! `process_queue`, and devices activated through the MMIO transport.

use std::path::Path;

use airlock_fuzz::{blk_dev, mmio, vsock_conn};
use airlock_vmm::devices::virtio::vsock::packet::{
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
};
use ttrpc::Code;
use vm_memory::{Bytes, GuestAddress};

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn vsock_lifecycle_establishes_a_connection_and_runs_credit_and_shutdown() {
    let t = vsock_conn::vsock_connection_trace(&seed("vsock_connection", "lifecycle"));
    // The host's CONNECT became a REQUEST to the guest; the guest's
    // RESPONSE established it: the host client read "OK <port>".
    assert_eq!(t.to_guest.first(), Some(&OP_REQUEST), "{t:?}");
    assert_eq!(t.host_ok, 1, "{t:?}");
    assert_eq!(t.max_connections, 1, "{t:?}");
    // Host data reached the guest, guest data the host.
    assert!(t.to_guest.contains(&OP_RW), "{t:?}");
    assert_eq!(t.guest_bytes, 1000, "{t:?}");
    assert!(t.host_bytes > 300, "{t:?}");
    // The credit request was answered; the full shutdown ended with an RST
    // and the host client saw the end.
    assert!(t.to_guest.contains(&OP_CREDIT_UPDATE), "{t:?}");
    assert_eq!(t.to_guest.last(), Some(&OP_RST), "{t:?}");
    assert_eq!(t.host_eof, 1, "{t:?}");
}

#[test]
fn vsock_host_close_sends_the_guest_a_shutdown() {
    let t = vsock_conn::vsock_connection_trace(&seed("vsock_connection", "host_close"));
    assert_eq!(t.host_ok, 1, "{t:?}");
    assert!(t.to_guest.contains(&OP_SHUTDOWN), "{t:?}");
}

#[test]
fn vsock_guest_connect_reaches_the_host_listener() {
    let t = vsock_conn::vsock_connection_trace(&seed("vsock_connection", "guest_connect"));
    assert_eq!(t.host_accepted, 1, "{t:?}");
    assert_eq!(t.to_guest.first(), Some(&OP_RESPONSE), "{t:?}");
    assert_eq!(t.guest_bytes, 500, "{t:?}");
    assert_eq!(t.host_bytes, 64, "{t:?}");
    assert_eq!(t.to_guest.last(), Some(&OP_RST), "{t:?}");
}

#[test]
fn vsock_refused_guest_connections_get_resets() {
    let t = vsock_conn::vsock_connection_trace(&seed("vsock_connection", "refused"));
    assert_eq!(t.host_accepted, 0, "{t:?}");
    assert_eq!(t.max_connections, 0, "{t:?}");
    assert!(!t.to_guest.is_empty(), "{t:?}");
    assert!(t.to_guest.iter().all(|&op| op == OP_RST), "{t:?}");
}

#[test]
fn vsock_guest_overrunning_its_credit_is_reset() {
    let t = vsock_conn::vsock_connection_trace(&seed("vsock_connection", "overrun"));
    assert_eq!(t.host_ok, 1, "{t:?}");
    assert_eq!(t.to_guest.last(), Some(&OP_RST), "{t:?}");
}

#[test]
fn vsock_unanswered_request_times_out() {
    // The timeouts are zero and the sweep runs every millisecond: on a
    // machine busy enough to let a millisecond pass between two of the
    // script's steps, the second client's handshake expires before its
    // CONNECT line is read. A few tries, then.
    let data = seed("vsock_connection", "timeouts");
    let traces: Vec<_> = (0..5)
        .map(|_| vsock_conn::vsock_connection_trace(&data))
        .collect();
    assert!(traces.iter().all(|t| t.host_ok == 0), "{traces:?}");
    assert!(
        traces.iter().any(|t| t.to_guest == [OP_REQUEST, OP_RST]),
        "{traces:?}"
    );
}

const BLK_OK: u8 = 0;
const BLK_IOERR: u8 = 1;

fn blk(name: &str) -> blk_dev::BlkRun {
    let run = blk_dev::blk_device_run(&seed("blk_device", name)).expect("the seed runs");
    assert!(run.interrupted, "{name}: no interrupt");
    run
}

fn status(run: &blk_dev::BlkRun) -> u8 {
    run.mem.read_obj(GuestAddress(0x8000)).unwrap()
}

#[test]
fn blk_device_serves_reads_and_writes_through_process_queue() {
    for name in ["read", "write", "flush", "read_read_only"] {
        let run = blk(name);
        assert_eq!(status(&run), BLK_OK, "{name}");
        let data = match name {
            "read" | "write" => 512,
            "read_read_only" => 1024,
            _ => 0,
        };
        // The used length is the data written to the guest plus the status.
        let written = if name == "write" { 0 } else { data };
        assert_eq!(run.used, [(0, written + 1)], "{name}");
    }
}

#[test]
fn blk_device_refuses_writes_to_a_read_only_image_and_reads_past_the_end() {
    for name in ["write_read_only", "past_the_end"] {
        let run = blk(name);
        assert_eq!(status(&run), BLK_IOERR, "{name}");
        assert_eq!(run.used, [(0, 1)], "{name}");
    }
}

#[test]
fn blk_device_answers_get_id() {
    let run = blk("get_id");
    assert_eq!(status(&run), BLK_OK);
    let mut id = [0u8; 10];
    run.mem.read_slice(&mut id, GuestAddress(0x7000)).unwrap();
    assert_eq!(&id, b"fuzz-drive");
}

#[test]
fn mmio_seeds_activate_each_device_and_reset_it() {
    const DRIVER_OK_ALL: u32 = 0xf;
    for (name, id) in [("rng", 4), ("rng_limited", 4), ("blk", 2), ("vsock", 19)] {
        let t = mmio::mmio_trace(&seed("mmio_transport", name));
        assert_eq!(t.device_id, id, "{name}");
        assert!(t.active_seen > 0, "{name}: never active: {t:?}");
        assert!(
            t.status_reads
                .iter()
                .any(|s| s & DRIVER_OK_ALL == DRIVER_OK_ALL),
            "{name}: {t:?}"
        );
    }
    let t = mmio::mmio_trace(&seed("mmio_transport", "rng"));
    // Reset (status 0) then brought up again.
    assert_eq!(t.status_reads, [DRIVER_OK_ALL, 0, DRIVER_OK_ALL], "{t:?}");
    assert_eq!(t.final_status, DRIVER_OK_ALL, "{t:?}");
}

#[test]
fn mmio_invalid_queues_ask_for_a_reset() {
    let t = mmio::mmio_trace(&seed("mmio_transport", "refused"));
    assert_eq!(t.active_seen, 0, "{t:?}");
    // FEATURES_OK did not stick without VERSION_1; the activation with a
    // queue outside guest memory set DEVICE_NEEDS_RESET.
    assert_eq!(t.status_reads.first(), Some(&0x3), "{t:?}");
    assert_ne!(t.final_status & 0x40, 0, "{t:?}");
}

fn agent(name: &str) -> airlock_fuzz::agent::Trace {
    airlock_fuzz::agent::agent_request_trace(&seed("agent_request", name))
}

fn codes(t: &airlock_fuzz::agent::Trace) -> Vec<Option<Code>> {
    t.iter().map(|(_, c)| *c).collect()
}

#[test]
fn agent_seeds_reach_every_handler() {
    let mut reached: Vec<&str> = Vec::new();
    for name in [
        "check",
        "sandbox",
        "create_container",
        "create_container_hostile",
        "exec_process",
        "update",
        "processes",
        "files",
        "escape",
        "read_file",
        "network",
    ] {
        let t = agent(name);
        // Every payload decoded: the handler ran.
        assert!(t.iter().all(|(_, c)| c.is_some()), "{name}: {t:?}");
        reached.extend(t.iter().map(|(m, _)| *m));
    }
    for m in airlock_fuzz::agent::METHODS {
        assert!(reached.contains(m), "no seed calls {m}");
    }
}

#[test]
fn agent_file_requests_work_inside_the_fake_root() {
    let t = agent("files");
    assert_eq!(
        codes(&t),
        vec![Some(Code::OK); 7]
            .into_iter()
            .chain([Some(Code::NOT_FOUND)])
            .collect::<Vec<_>>(),
        "{t:?}"
    );
    let t = agent("read_file");
    assert_eq!(codes(&t), [Some(Code::OK)], "{t:?}");
}

#[test]
fn agent_escapes_stay_in_the_root_and_fifos_do_not_block() {
    let t = agent("escape");
    let expected = [
        Code::OK,                  // /../../../etc/hostname is the root's
        Code::OK,                  // so is /up/etc/hostname
        Code::OK,                  // /abs (a symlink to /) is the root
        Code::OK,                  // /abs/etc/x is the root's /etc/x
        Code::FAILED_PRECONDITION, // /fifo: ESPIPE, not a hang
        Code::FAILED_PRECONDITION, // /fifo without a reader: ENXIO
        Code::FAILED_PRECONDITION, // a symlink loop: ELOOP
        Code::OK,                  // /up lists the root
        Code::INVALID_ARGUMENT,    // removing / is refused
        Code::INVALID_ARGUMENT,    // so is making "y" through ".."
        Code::NOT_FOUND,           // no container "c"
    ];
    assert_eq!(codes(&t), expected.map(Some), "{t:?}");
}

#[test]
fn agent_network_is_checked_then_configured_once() {
    // A bad version and an unknown MAC are refused; the good request is
    // applied (to the fake); a second one is too late.
    let t = agent("network");
    let expected = [
        Code::INVALID_ARGUMENT,
        Code::INVALID_ARGUMENT,
        Code::OK,
        Code::FAILED_PRECONDITION,
    ];
    assert_eq!(codes(&t), expected.map(Some), "{t:?}");
}

#[test]
fn agent_containers_fail_before_any_launch() {
    // A valid spec gets as far as mounting, which the fake refuses.
    let t = agent("create_container");
    assert_eq!(codes(&t), [Some(Code::OK), Some(Code::INTERNAL)], "{t:?}");
    // Hostile ids, specs, options and archives are refused before that;
    // namespace paths that would join the agent's are dropped, so that
    // spec gets as far as the valid one.
    let t = agent("create_container_hostile");
    let mut expected = [Some(Code::INVALID_ARGUMENT); 9];
    expected[8] = Some(Code::INTERNAL);
    assert_eq!(codes(&t), expected, "{t:?}");
    let t = agent("exec_process");
    assert!(t.iter().all(|(_, c)| *c == Some(Code::NOT_FOUND)), "{t:?}");
    // Process requests on a container that does not exist; a signal number
    // that is no signal is refused first.
    let t = agent("processes");
    let mut expected = [Some(Code::NOT_FOUND); 11];
    expected[3] = Some(Code::INVALID_ARGUMENT);
    assert_eq!(codes(&t), expected, "{t:?}");
}

#[test]
fn virtio_net_seeds_send_and_receive_frames() {
    use airlock_fuzz::virtio::{virtio_net_trace, NetTrace};
    let run = |name| virtio_net_trace(&seed("virtio_net", name)).unwrap();
    // The tx frame reached the network; nothing for an rx queue without
    // buffers (its zero-length frames stay unread).
    assert_eq!(run("tx").sent, 1);
    assert_eq!(run("tx").rx_used, 0);
    // One frame in the one buffer; the next is not even read.
    assert_eq!(
        run("rx"),
        NetTrace {
            sent: 0,
            rx_used: 1,
            dropped: 0
        }
    );
    // 2500 bytes over three mergeable chains (one of two descriptors);
    // the 60-byte frame waits for a fourth.
    assert_eq!(run("rx_mergeable").rx_used, 3);
    // Without mergeable buffers the 3000-byte frame is dropped and the
    // 1526-byte one takes a chain; the empty ones read as an end of file.
    let t = run("rx_single");
    assert_eq!((t.rx_used, t.dropped), (1, 1));
    // Malformed chains both ways: nothing sent, frames dropped.
    let t = run("malformed");
    assert_eq!(t.sent, 0);
    assert!(t.dropped >= 3, "{t:?}");
}

#[test]
fn egress_seeds_hold_the_names_the_filter_reads() {
    use airlock_net::filter::{http, sni};
    assert_eq!(
        sni::server_name(&seed("egress_first_bytes", "tls")).as_deref(),
        Some("api.example.test")
    );
    assert_eq!(
        http::host(&seed("egress_first_bytes", "http")).as_deref(),
        Some("api.example.test")
    );
}
