//! Sandbox networks end to end (`--net`, the egress policy, `airlock net`):
//! real microVMs on real KVM, the real guest kernel, agent and python
//! image, talking to the test's "internet" (`airlock_e2e::internet`):
//! servers in a namespace inside the test host, on documentation
//! addresses, with a DNS server of the test's own. No packet leaves the
//! test host.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use airlock_e2e::internet::{
    self, Internet, API, HOST_ADDR, HTTP_PORT, METADATA, OTHER, PRIVATE, WEB,
};
use airlock_e2e::{airlock_binary, assert_one_line_error, on_real_kvm, show};

/// The guest's probe: each check of its argument (a JSON array of
/// arrays, which is a Python literal too) on a line of its own, `CHECK
/// <tab> ok ...|error ... <tab> SECONDS`, CHECK as compact JSON. Python's
/// socket module only: the image has python3.11-minimal (no json).
const PROBE: &str = r#"
import ast, socket, ssl, struct, sys, time
def http(addr, port, host):
    s = socket.create_connection((addr, port), 5)
    s.sendall(("GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % host).encode())
    data = b""
    while True:
        c = s.recv(4096)
        if not c:
            break
        data += c
    if not data.startswith(b"HTTP/"):
        raise OSError("no HTTP answer: %r" % data[:80])
    return data.split(b"\r\n\r\n", 1)[1].decode().strip()
def name(n):
    return socket.gethostbyname(n)
def tls(addr, port, sni):
    s = socket.create_connection((addr, port), 5)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.wrap_socket(s, server_hostname=sni)
    return "handshake"
def udp(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.connect((addr, port))
    s.send(b"ping")
    return s.recv(100).decode()
def dns(server, n):
    q = struct.pack(">HHHHHH", 0x4242, 0x100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in n.split(".")) + b"\0\0\1\0\1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(q, (server, 53))
    r = s.recv(512)
    return "rcode %d answers %d" % (r[3] & 15, struct.unpack(">H", r[6:8])[0])
def file(path):
    return open(path).read()
def nics():
    return " ".join(sorted(n for _, n in socket.if_nameindex()))
def key(check):
    return "[" + ",".join('"%s"' % x if isinstance(x, str) else str(x) for x in check) + "]"
for check in ast.literal_eval(sys.argv[1]):
    t = time.monotonic()
    try:
        out = "ok " + str(globals()[check[0]](*check[1:]))
    except Exception as e:
        out = "error %s: %s" % (type(e).__name__, e)
    out = out.replace("\t", " ").replace("\n", " ")
    print("%s\t%s\t%.2f" % (key(check), out, time.monotonic() - t), flush=True)
"#;

fn write_config(dir: &Path) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, Internet::config_toml()).unwrap();
    path.to_str().unwrap().to_string()
}

/// `airlock --config CONFIG ARGS`, with a deadline.
fn airlock(config: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(airlock_binary());
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null());
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(300),
        "airlock {args:?} took too long"
    );
    show(&format!("airlock {args:?}"), &out);
    out
}

/// The probe's results, by check, for `checks` run in a new sandbox with
/// `flags`; (results, the run's output).
fn probe(
    config: &str,
    flags: &[&str],
    checks: &serde_json::Value,
) -> (Vec<(String, String, f64)>, Output) {
    let checks = checks.to_string();
    let mut args = vec!["run", "--image", "python"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "python3", "-c", PROBE, &checks]);
    let out = airlock(config, &args);
    (results(&String::from_utf8_lossy(&out.stdout)), out)
}

/// The probe's lines in `stdout`: (check, result, seconds).
fn results(stdout: &str) -> Vec<(String, String, f64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (check, out, secs) = (f.next()?, f.next()?, f.next()?);
            Some((check.to_string(), out.to_string(), secs.parse().ok()?))
        })
        .collect()
}

/// The result of the check whose JSON starts with `prefix`.
fn result<'a>(results: &'a [(String, String, f64)], prefix: &str) -> &'a (String, String, f64) {
    results
        .iter()
        .find(|(c, _, _)| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no result for {prefix} in {results:#?}"))
}

fn assert_ok(results: &[(String, String, f64)], prefix: &str, needle: &str) {
    let (c, r, _) = result(results, prefix);
    assert!(
        r.starts_with("ok") && r.contains(needle),
        "{c}: expected ok with {needle:?}, got {r}"
    );
}

fn assert_refused(results: &[(String, String, f64)], prefix: &str) {
    let (c, r, _) = result(results, prefix);
    assert!(r.starts_with("error"), "{c}: expected it to fail, got {r}");
}

/// `airlock create --image python --net egress FLAGS`: the new sandbox's ID.
fn create_egress(config: &str, flags: &[&str]) -> String {
    let mut args = vec!["create", "--image", "python", "--net", "egress"];
    args.extend_from_slice(flags);
    let out = airlock(config, &args);
    assert_eq!(out.status.code(), Some(0));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Nothing of any sandbox's network is left on the host.
fn assert_no_network_left() {
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    assert!(
        !ns.contains("airlock-") || ns.lines().all(|l| l.starts_with(internet::NETNS)),
        "namespaces left: {ns}"
    );
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains(": alk"), "veths left: {links}");
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(!tables.contains("airlock-"), "nft tables left: {tables}");
    let filters = Command::new("pgrep")
        .arg("airlock-netfilter")
        .output()
        .unwrap();
    assert!(
        filters.stdout.is_empty(),
        "filters left: {}",
        String::from_utf8_lossy(&filters.stdout)
    );
}

#[test]
fn egress_reaches_the_internet_the_default_has_no_nic_and_the_defaults_deny() {
    on_real_kvm(
        "egress_reaches_the_internet_the_default_has_no_nic_and_the_defaults_deny",
        || {
            let _internet = Internet::start();
            let work = tempfile::tempdir().unwrap();
            let config = write_config(work.path());
            let web = WEB.to_string();
            let checks = serde_json::json!([
                ["nics"],
                ["file", "/etc/resolv.conf"],
                ["dns", "100.96.0.1", "api.example.test"],
                ["http", web, HTTP_PORT, "web.test"],
                ["name", "api.example.test"],
                ["http", HOST_ADDR.to_string(), HTTP_PORT, "host"],
                ["http", METADATA.to_string(), HTTP_PORT, "metadata"],
                ["http", PRIVATE.to_string(), HTTP_PORT, "private"],
                ["udp", web, internet::ECHO_PORT],
            ]);

            // The issue's own command: a page from the test's internet.
            let (r, out) = probe(&config, &["--net", "egress"], &checks);
            assert_eq!(out.status.code(), Some(0));
            assert_ok(&r, "[\"nics\"", "eth0 lo");
            assert_ok(
                &r,
                "[\"http\",\"198.51.100.10\"",
                "hello from 198.51.100.10 host=web.test",
            );
            assert_ok(&r, "[\"name\"", &API.to_string());
            assert_ok(
                &r,
                "[\"file\",\"/etc/resolv.conf\"",
                "nameserver 100.96.0.1",
            );
            assert_ok(&r, "[\"dns\"", "rcode 0 answers 1");
            assert_ok(&r, "[\"udp\"", "ping");
            // The defaults: the host's own address, the metadata address and
            // a private server are denied, at once.
            for denied in ["203.0.113.1", "169.254.169.254", "10.20.0.10"] {
                let prefix = format!("[\"http\",\"{denied}\"");
                assert_refused(&r, &prefix);
                assert!(
                    result(&r, &prefix).2 < 3.0,
                    "{denied}: not refused at once: {:?}",
                    result(&r, &prefix)
                );
            }
            // They are reachable from the host: the policy refused them.
            assert!(internet::reachable((METADATA, HTTP_PORT).into()));
            assert!(internet::reachable((PRIVATE, HTTP_PORT).into()));

            // The default: no NIC; the same fetch fails at once.
            let (r, out) = probe(&config, &[], &checks);
            assert_eq!(out.status.code(), Some(0));
            assert_ok(&r, "[\"nics\"", "lo");
            assert_eq!(result(&r, "[\"nics\"").1, "ok lo");
            let (c, e, secs) = result(&r, "[\"http\",\"198.51.100.10\"");
            assert!(e.contains("Network is unreachable"), "{c}: {e}");
            assert!(*secs < 1.0, "{c}: took {secs} s");
            assert_no_network_left();
        },
    );
}

#[test]
fn a_domain_allow_list_holds_against_a_root_tenant() {
    on_real_kvm("a_domain_allow_list_holds_against_a_root_tenant", || {
        let _internet = Internet::start();
        let work = tempfile::tempdir().unwrap();
        let config = write_config(work.path());
        let (api, other) = (API.to_string(), OTHER.to_string());
        let checks = serde_json::json!([
            ["http", "api.example.test", HTTP_PORT, "api.example.test"],
            ["name", "other.example.test"],
            ["http", other, HTTP_PORT, "other.example.test"],
            ["http", api, HTTP_PORT, "other.example.test"],
            ["http", api, HTTP_PORT, api],
            ["http", WEB.to_string(), HTTP_PORT, "web.test"],
            ["tls", api, HTTP_PORT, "other.example.test"],
            ["udp", api, internet::ECHO_PORT],
            ["dns", internet::DNS.to_string(), "other.example.test"],
        ]);
        let flags = [
            "--net",
            "egress",
            "--deny-out",
            "0.0.0.0/0",
            "--allow-out",
            "api.example.test",
        ];
        internet::take_seen();
        let (r, out) = probe(&config, &flags, &checks);
        // The servers saw the allowed request alone: what failed was
        // refused on the host, not by a server.
        let seen = internet::take_seen();
        assert_eq!(seen.len(), 1, "{seen:#?}");
        assert!(
            seen[0].starts_with("198.51.100.20:8080 GET / HTTP/1.0"),
            "{seen:#?}"
        );
        assert_eq!(out.status.code(), Some(0));
        assert_ok(
            &r,
            "[\"http\",\"api.example.test\"",
            "hello from 198.51.100.20 host=api.example.test",
        );
        // Another name: not even resolved.
        assert_refused(&r, "[\"name\",\"other.example.test\"");
        assert_refused(&r, "[\"http\",\"198.51.100.21\"");
        // The allowed address under another name, or as an IP literal.
        assert_refused(
            &r,
            "[\"http\",\"198.51.100.20\",8080,\"other.example.test\"",
        );
        assert_refused(&r, "[\"http\",\"198.51.100.20\",8080,\"198.51.100.20\"");
        assert_refused(&r, "[\"http\",\"198.51.100.10\"");
        assert_refused(&r, "[\"tls\"");
        // UDP to a denied address, and a DNS server of the tenant's own.
        assert_refused(&r, "[\"udp\"");
        assert_refused(&r, "[\"dns\"");

        // Root in the guest with CAP_NET_ADMIN: its own address on the
        // servers' network and routes that skip the gateway change
        // nothing; the host decides what leaves the tap.
        let spec = work.path().join("config.json");
        std::fs::write(&spec, root_spec()).unwrap();
        let script = format!(
            "ip addr add 198.51.100.99/24 dev eth0 && ip route add 192.0.2.53/32 dev eth0 && \
             echo nameserver 192.0.2.53 > /tmp/resolv.conf && mount --bind /tmp/resolv.conf /etc/resolv.conf && \
             echo tenant-rewired && python3 -c '{}' '{}'",
            PROBE.replace('\'', "'\"'\"'"),
            serde_json::json!([
                ["http", other, HTTP_PORT, "other.example.test"],
                ["http", WEB.to_string(), HTTP_PORT, "web.test"],
                ["name", "other.example.test"],
                ["http", "api.example.test", HTTP_PORT, "api.example.test"],
            ])
        );
        let mut args = vec!["--spec", spec.to_str().unwrap()];
        args.extend_from_slice(&flags);
        args.extend_from_slice(&["--", "sh", "-c", &script]);
        let out = airlock(
            &config,
            &[&["run", "--image", "python"][..], &args].concat(),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("tenant-rewired"),
            "the tenant could not rewire: {text}"
        );
        let seen = internet::take_seen();
        assert!(
            seen.iter().all(|c| c.contains("Host: api.example.test")),
            "{seen:#?}"
        );
        let r = results(&text);
        assert_refused(&r, "[\"http\",\"198.51.100.21\"");
        assert_refused(&r, "[\"http\",\"198.51.100.10\"");
        assert_refused(&r, "[\"name\"");
        assert_refused(&r, "[\"http\",\"api.example.test\"");
        assert_no_network_left();
    });
}

/// A spec whose process is root with every capability (CAP_NET_ADMIN
/// among them): the strongest tenant a sandbox can hold.
fn root_spec() -> String {
    let caps: Vec<String> = [
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_ADMIN",
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
    ]
    .iter()
    .map(|c| format!("\"{c}\""))
    .collect();
    let caps = caps.join(",");
    format!(
        r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}},
            "env":["PATH=/usr/bin:/bin"],
            "capabilities":{{"bounding":[{caps}],"effective":[{caps}],"permitted":[{caps}]}}}},
          "root":{{"path":"rootfs","readonly":false}},
          "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
                    {{"destination":"/tmp","type":"tmpfs","source":"tmpfs","options":["nosuid","nodev"]}}],
          "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}}]}}}}"#
    )
}

#[test]
fn a_running_sandboxs_policy_changes_with_airlock_net_and_rm_leaves_nothing() {
    on_real_kvm(
        "a_running_sandboxs_policy_changes_with_airlock_net_and_rm_leaves_nothing",
        || {
            let _internet = Internet::start();
            let work = tempfile::tempdir().unwrap();
            let config = write_config(work.path());
            let id = create_egress(&config, &["--deny-out", "198.51.100.10"]);
            let fetch = |expect_ok: bool| {
                let checks = serde_json::json!([["http", WEB.to_string(), HTTP_PORT, "web.test"]])
                    .to_string();
                let out = airlock(
                    &config,
                    &["exec", &id, "--", "python3", "-c", PROBE, &checks],
                );
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                assert_eq!(
                    text.contains("\tok hello from 198.51.100.10"),
                    expect_ok,
                    "{text}"
                );
            };
            fetch(false);
            let out = airlock(&config, &["net", &id, "--json"]);
            assert_eq!(out.status.code(), Some(0));
            assert!(String::from_utf8_lossy(&out.stdout).contains("\"deny\":[\"198.51.100.10\"]"));
            let out = airlock(&config, &["net", &id, "--deny-out", "192.0.2.0/24"]);
            assert_eq!(out.status.code(), Some(0));
            fetch(true);
            let out = airlock(&config, &["net", &id, "--deny-out", "ex ample"]);
            assert_one_line_error(&out, 125, "ex ample");
            let out = airlock(&config, &["rm", &id]);
            assert_eq!(out.status.code(), Some(0));
            assert_no_network_left();
        },
    );
}

#[test]
fn bad_network_flags_get_one_line_and_create_nothing() {
    // These fail before any VM boots: they run on any machine.
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let config = work.path().join("config.toml");
    std::fs::write(&config, format!("state_dir = \"{}\"\n", state.display())).unwrap();
    let config = config.to_str().unwrap();
    for (flags, needle) in [
        (
            &["--net", "bogus"][..],
            "--net \"bogus\": unknown network mode (use none or egress)",
        ),
        (
            &["--net", "egress", "--allow-out", "300.1.1.1/33"],
            "\"300.1.1.1/33\"",
        ),
        (
            &["--net", "egress", "--allow-out", "ex ample"],
            "\"ex ample\"",
        ),
        (
            &["--net", "egress", "--deny-out", "example.com"],
            "--deny-out takes a CIDR or IP address",
        ),
        (&["--allow-out", "192.0.2.1"], "add --net egress"),
    ] {
        for cmd in ["run", "create"] {
            let mut args = vec![cmd];
            args.extend_from_slice(flags);
            if cmd == "run" {
                args.extend_from_slice(&["--", "true"]);
            }
            let out = airlock(config, &args);
            assert_one_line_error(&out, 125, needle);
        }
    }
    assert!(
        !state.exists() || std::fs::read_dir(&state).unwrap().next().is_none(),
        "state was created"
    );
}

/// CPU ticks (utime + stime) of every thread of `pid`.
fn process_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime: fields 14 and 15 of stat, whose field 3 (the
    // state) is the first after the command's closing parenthesis.
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

#[test]
fn a_tx_flood_and_oversized_frames_leave_the_vmm_bounded() {
    on_real_kvm(
        "a_tx_flood_and_oversized_frames_leave_the_vmm_bounded",
        || {
            let _internet = Internet::start();
            let work = tempfile::tempdir().unwrap();
            let config = write_config(work.path());
            let spec = work.path().join("config.json");
            std::fs::write(&spec, root_spec()).unwrap();
            let id = create_egress(&config, &["--spec", spec.to_str().unwrap()]);
            let vmm = airlock_e2e::vmm_processes()
                .into_iter()
                .find(|p| p.contains(&id))
                .unwrap_or_else(|| panic!("no VMM of {id}"));
            let pid = vmm.split(' ').next().unwrap().to_string();
            let anon = || {
                airlock_e2e::proc_status(&pid, "RssAnon")
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
            };
            let (anon_before, ticks_before, started) =
                (anon(), process_ticks(&pid), Instant::now());
            // 10 s of UDP as fast as the guest can send: to the echo server
            // (replies flood rx too), to a denied address, and, with the
            // guest's MTU raised to 9000, frames over the tap's 1500.
            let flood = format!(
                "ip link set eth0 mtu 9000; python3 -c '
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end, n = time.monotonic() + 10, 0
while time.monotonic() < end:
    for dst, size in ((\"{WEB}\", 1400), (\"10.20.0.10\", 1400), (\"{WEB}\", 8000)):
        try:
            s.sendto(b\"x\" * size, (dst, {}))
            n += 1
        except OSError:
            pass
print(\"sent\", n)
'",
                internet::ECHO_PORT
            );
            let out = airlock(&config, &["exec", &id, "--", "sh", "-c", &flood]);
            assert_eq!(out.status.code(), Some(0));
            assert!(String::from_utf8_lossy(&out.stdout).contains("sent"));
            let secs = started.elapsed().as_secs_f64();
            let ticks = process_ticks(&pid) - ticks_before;
            // SAFETY: sysconf only reads its argument.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
            let cores = ticks as f64 / hz / secs;
            println!(
                "VMM: {cores:.2} cores over {secs:.1} s, RssAnon {anon_before} -> {} KiB",
                anon()
            );
            // One vCPU and one net worker at most: the flood cannot make the
            // VMM use more, nor hold its frames in memory.
            assert!(cores <= 2.2, "the VMM used {cores:.2} cores");
            assert!(
                anon() <= anon_before + 16 * 1024,
                "RssAnon {anon_before} -> {} KiB",
                anon()
            );
            // And the sandbox still works.
            let out = airlock(&config, &["exec", &id, "--", "echo", "still up"]);
            assert_eq!(String::from_utf8_lossy(&out.stdout), "still up\n");
            let out = airlock(&config, &["rm", &id]);
            assert_eq!(out.status.code(), Some(0));
            assert_no_network_left();
        },
    );
}
