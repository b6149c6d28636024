//! A sandbox's network, on the host side. Modes (`airlock run --net`):
//!
//! * `none` (the default): no NIC at all; the guest has only `lo`.
//! * `egress`: outbound TCP/UDP through NAT, under the sandbox's policy.
//!
//! In `egress`, each sandbox gets a network namespace of its own on the
//! host (`airlock-<id>`, [`netns`]), which holds:
//!
//! ```text
//!  guest eth0 100.96.0.2/30 ── tap0 100.96.0.1 ┐ sandbox namespace: the policy
//!                                              │ (nft table `ip airlock`),
//!                          veth0 <slot>.2/30 ──┘ the filter's sockets
//!                                │
//!  host namespace:  alk<hash> <slot>.1/30, table `ip airlock-<id>`:
//!                   forward + masquerade out, replies in, no input
//! ```
//!
//! The tap's descriptor goes to the VMM ([`tap`]); the VMM's own jail has
//! an empty namespace of its own. The policy ([`airlock_net::policy`]) is
//! enforced in the sandbox namespace ([`nft`]) and by the filter process
//! ([`filter`], `airlock-netfilter`: DNS, and the proxy that lets TCP
//! through by TLS SNI or HTTP Host when the policy names domains), never
//! by the guest. Teardown removes the namespace (and with it the tap, the
//! veth and the sandbox's rules), the host table, the filter and the
//! address slot.

pub mod filter;
pub mod netns;
pub mod nft;
pub mod pod;
mod record;
pub mod settings;
pub mod support;
pub mod tap;

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

pub use airlock_net::policy::{AllowRule, Policy, PolicyError};
use ipnet::Ipv4Net;
pub use record::NetRecord;
pub use settings::{NetMode, NetOptions, NetworkSettings};

use netns::Netns;

/// The guest's address in `egress` mode (the same in every sandbox: each
/// has its own namespace).
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
/// Its gateway: the tap's address, where the filter answers DNS.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// The guest link's prefix length.
pub const GUEST_PREFIX: u8 = 30;
/// The filter's DNS port on the gateway.
pub const DNS_PORT: u16 = 53;
/// The filter's proxy port on the gateway.
pub const PROXY_PORT: u16 = 15001;
/// The veth's name inside the sandbox's namespace.
pub const UPLINK: &str = "veth0";

/// Errors setting up, changing or removing a sandbox's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("--net {0:?}: unknown network mode (use none or egress)")]
    BadMode(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("invalid [network] config: {0}")]
    Settings(String),
    #[error("cannot {what}: `{command}` failed: {stderr}")]
    Command {
        what: &'static str,
        command: String,
        stderr: String,
    },
    #[error("cannot run {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    #[error("cannot {what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "airlock-netfilter not found at {} (nor on $PATH): build it (scripts/setup), or set \
         [network] netfilter_binary", .0.display()
    )]
    NoFilter(PathBuf),
    #[error("the network filter did not start: {reason} (see {})", .log.display())]
    FilterFailed { reason: String, log: PathBuf },
    #[error("every address slot of [network] veth_pool = {0} is held by a live sandbox")]
    NoSlot(Ipv4Net),
    #[error("sandbox {0} has no network (it was created with --net none)")]
    NoNetwork(String),
    #[error("this host cannot give sandboxes a network: {0}")]
    Unsupported(String),
    #[error("pod networking: {0}")]
    Pod(String),
    #[error("a network thread panicked")]
    Panicked,
}

impl NetError {
    fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// What the guest is told of its network (the agent's `ConfigureNetwork`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLink {
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub mtu: u32,
    pub nameservers: Vec<IpAddr>,
}

/// A sandbox's network as set up: its record, the tap for the VMM, and
/// what the guest is to be told.
#[derive(Debug)]
pub struct SandboxNet {
    pub tap: OwnedFd,
    /// The guest NIC's MAC.
    pub mac: airlock_vmm_api::MacAddr,
    pub guest: GuestLink,
}

/// Sets up the network `opts` asks for, for sandbox `id` with state dir
/// `dir`; `None` for `--net none`. On failure, whatever was made is
/// removed again.
pub fn setup(
    settings: &NetworkSettings,
    state_root: &Path,
    dir: &Path,
    id: &str,
    opts: &NetOptions,
    die_with_parent: bool,
) -> Result<Option<SandboxNet>, NetError> {
    if let Some(path) = &opts.pod_netns {
        return pod_setup(path, dir).map(Some);
    }
    if opts.mode == NetMode::None {
        return Ok(None);
    }
    support::check_egress()?;
    let filter_binary = filter::binary(settings.netfilter_binary.as_deref())?;
    let slot = record::reserve_slot(state_root, id, settings.veth_pool)?;
    let record = NetRecord::new(id, slot, settings.veth_pool);
    record.write(dir)?;
    match egress(
        settings,
        &filter_binary,
        dir,
        &record,
        opts,
        die_with_parent,
    ) {
        Ok(net) => Ok(Some(net)),
        Err(e) => {
            teardown(state_root, dir);
            Err(e)
        }
    }
}

fn egress(
    settings: &NetworkSettings,
    filter_binary: &Path,
    dir: &Path,
    record: &NetRecord,
    opts: &NetOptions,
    die_with_parent: bool,
) -> Result<SandboxNet, NetError> {
    let ns = Netns::for_sandbox(&record.id);
    ns.create()?;
    let (host_ip, ns_ip) = record.veth_addrs();
    let host_cidr = format!("{host_ip}/30");
    let ns_cidr = format!("{ns_ip}/30");
    netns::run(
        netns::ip_command().args([
            "link",
            "add",
            &record.veth,
            "type",
            "veth",
            "peer",
            "name",
            UPLINK,
            "netns",
            &ns.name(),
        ]),
        "create the sandbox's veth",
    )?;
    netns::run(
        netns::ip_command().args(["addr", "add", &host_cidr, "dev", &record.veth]),
        "address the sandbox's veth",
    )?;
    netns::run(
        netns::ip_command().args(["link", "set", &record.veth, "up"]),
        "bring up the sandbox's veth",
    )?;
    ns.ip(
        &["link", "set", "lo", "up"],
        "bring up lo in the sandbox's namespace",
    )?;
    ns.ip(
        &["addr", "add", &ns_cidr, "dev", UPLINK],
        "address the sandbox's veth",
    )?;
    ns.ip(
        &["link", "set", UPLINK, "up"],
        "bring up the sandbox's veth",
    )?;
    ns.ip(
        &["route", "add", "default", "via", &host_ip.to_string()],
        "route the sandbox's namespace to the host",
    )?;
    let tap = tap::open(&ns)?;
    let tap_name = tap::TAP_NAME.to_string_lossy();
    ns.ip(
        &[
            "addr",
            "add",
            &format!("{GATEWAY_ADDR}/{GUEST_PREFIX}"),
            "dev",
            &tap_name,
        ],
        "address the tap",
    )?;
    ns.ip(
        &[
            "link",
            "set",
            &tap_name,
            "mtu",
            &settings.mtu.to_string(),
            "up",
        ],
        "bring up the tap",
    )?;
    enable_forwarding(Some(&ns))?;
    enable_forwarding(None)?;
    let host_addrs = host_addresses()?;
    write_policy(dir, &opts.policy)?;
    nft::apply(
        Some(&ns),
        &sandbox_rules(&opts.policy, &host_addrs).ruleset(),
    )?;
    nft::apply(None, &nft::host_ruleset(&record.host_table, &record.veth))?;
    let upstream = settings.upstream_dns()?;
    let pid = filter::start(
        filter_binary,
        dir,
        &filter::FilterConfig {
            netns: ns.path(),
            listen: GATEWAY_ADDR,
            dns_port: DNS_PORT,
            proxy_port: PROXY_PORT,
            upstream_dns: upstream,
            policy_file: policy_path(dir),
            host_addrs: host_addrs.clone(),
        },
        die_with_parent,
    )?;
    let mut record = record.clone();
    record.filter_pid = Some(pid);
    record.filter_start_time = crate::procs::start_time(pid);
    record.write(dir)?;
    Ok(SandboxNet {
        mac: record.mac,
        guest: GuestLink {
            mac: record.mac.to_string(),
            address: GUEST_ADDR,
            prefix: GUEST_PREFIX,
            gateway: Some(GATEWAY_ADDR),
            mtu: settings.mtu,
            nameservers: vec![IpAddr::V4(GATEWAY_ADDR)],
        },
        tap,
    })
}

/// A pod's NIC in its CNI namespace ([`pod`]), recorded for the teardown.
fn pod_setup(path: &Path, dir: &Path) -> Result<SandboxNet, NetError> {
    support::check_pods()?;
    let (tap, guest, link) = pod::setup(path)?;
    let record = dir.join(POD_RECORD);
    let json = serde_json::to_vec(&link).map_err(|e| NetError::io("write", &record, e.into()))?;
    if let Err(e) = std::fs::write(&record, json) {
        pod::teardown(&link);
        return Err(NetError::io("write", record, e));
    }
    let mac = guest
        .mac
        .parse()
        .map_err(|e| NetError::Pod(format!("the pod interface's MAC {}: {e}", guest.mac)))?;
    Ok(SandboxNet { tap, mac, guest })
}

/// The record of a pod's NIC in its state dir.
const POD_RECORD: &str = "pod-net.json";

/// The sandbox namespace's rules for `policy`.
fn sandbox_rules(policy: &Policy, host_addrs: &[IpAddr]) -> nft::SandboxRules {
    let v4 = |n: &ipnet::IpNet| match n {
        ipnet::IpNet::V4(n) => Some(*n),
        ipnet::IpNet::V6(_) => None,
    };
    let mut deny: Vec<Ipv4Net> = policy.deny.iter().filter_map(v4).collect();
    deny.extend(Policy::default_denials().iter().filter_map(v4));
    deny.extend(host_addrs.iter().filter_map(|a| match a {
        IpAddr::V4(a) => Some(Ipv4Net::from(*a)),
        IpAddr::V6(_) => None,
    }));
    nft::SandboxRules {
        tap: tap::TAP_NAME.to_string_lossy().into_owned(),
        uplink: UPLINK.into(),
        gateway: GATEWAY_ADDR,
        dns_port: DNS_PORT,
        allow: policy.allowed_nets().filter_map(v4).collect(),
        deny,
        proxy_port: policy.has_domains().then_some(PROXY_PORT),
    }
}

fn policy_path(dir: &Path) -> PathBuf {
    dir.join("policy.json")
}

fn write_policy(dir: &Path, policy: &Policy) -> Result<(), NetError> {
    let path = policy_path(dir);
    let json = serde_json::to_vec_pretty(policy)
        .map_err(|e| NetError::io("write", path.clone(), e.into()))?;
    let tmp = dir.join("policy.json.tmp");
    std::fs::write(&tmp, json).map_err(|e| NetError::io("write", tmp.clone(), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| NetError::io("write", path, e))
}

/// The policy of the sandbox whose state dir is `dir`.
pub fn read_policy(dir: &Path) -> Result<Policy, NetError> {
    let path = policy_path(dir);
    let bytes = std::fs::read(&path).map_err(|e| NetError::io("read", path.clone(), e))?;
    serde_json::from_slice(&bytes).map_err(|e| NetError::io("parse", path, e.into()))
}

/// Replaces the policy of a running sandbox: its rules, then its filter.
pub fn update_policy(dir: &Path, id: &str, policy: &Policy) -> Result<(), NetError> {
    let record = NetRecord::read(dir)?.ok_or_else(|| NetError::NoNetwork(id.into()))?;
    let ns = Netns::for_sandbox(&record.id);
    let host_addrs = host_addresses()?;
    nft::apply(Some(&ns), &sandbox_rules(policy, &host_addrs).ruleset())?;
    write_policy(dir, policy)?;
    if let Some(pid) = record.filter_pid {
        filter::reload(pid)?;
    }
    Ok(())
}

/// Removes what [`setup`] made for the sandbox whose state dir is `dir`,
/// as far as its record says; best effort, each failure logged.
pub fn teardown(state_root: &Path, dir: &Path) {
    if let Ok(bytes) = std::fs::read(dir.join(POD_RECORD)) {
        match serde_json::from_slice::<pod::PodLink>(&bytes) {
            Ok(link) => pod::teardown(&link),
            Err(e) => tracing::warn!("{}: {e}", dir.join(POD_RECORD).display()),
        }
        let _ = std::fs::remove_file(dir.join(POD_RECORD));
    }
    let record = match NetRecord::read(dir) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("{e}");
            return;
        }
    };
    if let Some(pid) = record.filter_pid {
        filter::stop(pid, record.filter_start_time);
    }
    if let Err(e) = nft::delete_host_table(&record.host_table) {
        tracing::warn!("removing the network of {}: {e}", record.id);
    }
    if Path::new("/sys/class/net").join(&record.veth).exists() {
        if let Err(e) = netns::run(
            netns::ip_command().args(["link", "delete", &record.veth]),
            "delete the sandbox's veth",
        ) {
            tracing::warn!("removing the network of {}: {e}", record.id);
        }
    }
    if let Err(e) = Netns::for_sandbox(&record.id).delete() {
        tracing::warn!("removing the network of {}: {e}", record.id);
    }
    record::release_slot(state_root, record.slot);
    record.remove(dir);
}

/// Turns on IPv4 forwarding in `ns` (else in the host's namespace).
fn enable_forwarding(ns: Option<&Netns>) -> Result<(), NetError> {
    let write = || {
        let path = PathBuf::from("/proc/sys/net/ipv4/ip_forward");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            return Ok(());
        }
        if ns.is_none() {
            tracing::info!(
                "enabling IPv4 forwarding on the host (net.ipv4.ip_forward = 1) for --net egress"
            );
        }
        std::fs::write(&path, "1").map_err(|e| NetError::io("write", path, e))
    };
    match ns {
        Some(ns) => ns.run_in(write),
        None => write(),
    }
}

/// The host namespace's own addresses, which a sandbox may not reach
/// unless its policy allows them by address.
pub fn host_addresses() -> Result<Vec<IpAddr>, NetError> {
    #[derive(serde::Deserialize)]
    struct Link {
        #[serde(default)]
        addr_info: Vec<Addr>,
    }
    #[derive(serde::Deserialize)]
    struct Addr {
        local: Option<IpAddr>,
    }
    let out = netns::run(
        netns::ip_command().args(["-j", "addr", "show"]),
        "list the host's addresses",
    )?;
    let links: Vec<Link> = serde_json::from_str(&out).map_err(|e| {
        NetError::io(
            "parse `ip -j addr show` of",
            PathBuf::from("the host"),
            e.into(),
        )
    })?;
    Ok(links
        .into_iter()
        .flat_map(|l| l.addr_info)
        .filter_map(|a| a.local)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_deny_defaults_and_host_addresses_and_use_the_proxy_only_for_domains() {
        let mut policy = Policy::default();
        policy.deny.push("0.0.0.0/0".parse().unwrap());
        let host = [
            "203.0.113.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        let rules = sandbox_rules(&policy, &host);
        assert!(rules.deny.contains(&"203.0.113.1/32".parse().unwrap()));
        assert!(rules.deny.contains(&"169.254.0.0/16".parse().unwrap()));
        assert!(rules.deny.contains(&"0.0.0.0/0".parse().unwrap()));
        assert_eq!(rules.proxy_port, None);
        policy.allow.push("api.example.test".parse().unwrap());
        policy.allow.push("198.51.100.0/24".parse().unwrap());
        let rules = sandbox_rules(&policy, &host);
        assert_eq!(rules.proxy_port, Some(PROXY_PORT));
        assert_eq!(
            rules.allow,
            vec!["198.51.100.0/24".parse::<Ipv4Net>().unwrap()]
        );
    }

    #[test]
    fn host_addresses_include_loopback() {
        // `ip` is part of every Debian host; lo always has 127.0.0.1.
        let addrs = host_addresses().unwrap();
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
    }
}
