//! What a sandbox's network setup made, in `<state>/net.json`, so that any
//! later command (or a cleanup after a crash) can remove it; and the
//! address slots of `[network] veth_pool` that sandboxes hold, reserved
//! as `.net-<slot>` files in the state root (as jail uids are).

use std::net::Ipv4Addr;
use std::path::Path;

use airlock_vmm_api::MacAddr;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::NetError;

/// The record of one sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRecord {
    /// The sandbox.
    pub id: String,
    /// Its /30 in the pool: the `slot`-th.
    pub slot: u32,
    pub pool: Ipv4Net,
    /// The veth's host end (`alk` + 12 hex digits of the id's hash: names
    /// are at most 15 bytes).
    pub veth: String,
    /// Its table in the host's namespace.
    pub host_table: String,
    /// The guest NIC's MAC (locally administered, random).
    pub mac: MacAddr,
    pub filter_pid: Option<u32>,
    pub filter_start_time: Option<u64>,
}

impl NetRecord {
    pub fn new(id: &str, slot: u32, pool: Ipv4Net) -> Self {
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(id.as_bytes()));
        let mut mac = [0u8; 6];
        if getrandom::fill(&mut mac[1..]).is_err() {
            mac[1..].copy_from_slice(&hash.as_bytes()[..5]);
        }
        // Locally administered, unicast.
        mac[0] = 0x02;
        Self {
            id: id.into(),
            slot,
            pool,
            veth: format!("alk{}", &hash[..12]),
            host_table: format!("airlock-{}", &hash[..12]),
            mac: MacAddr(mac),
            filter_pid: None,
            filter_start_time: None,
        }
    }

    /// The veth's two addresses: (host end, sandbox end).
    pub fn veth_addrs(&self) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.pool.network()).wrapping_add(self.slot.wrapping_mul(4));
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }

    pub fn write(&self, dir: &Path) -> Result<(), NetError> {
        let path = dir.join("net.json");
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| NetError::io("write", path.clone(), e.into()))?;
        std::fs::write(&path, json).map_err(|e| NetError::io("write", path, e))
    }

    /// The record in `dir`, if the sandbox has a network.
    pub fn read(dir: &Path) -> Result<Option<Self>, NetError> {
        let path = dir.join("net.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| NetError::io("parse", path, e.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(NetError::io("read", path, e)),
        }
    }

    pub fn remove(&self, dir: &Path) {
        let _ = std::fs::remove_file(dir.join("net.json"));
    }
}

/// How many /30 slots `pool` has.
pub fn slots(pool: Ipv4Net) -> u32 {
    let bits = 32 - u32::from(pool.prefix_len());
    if bits < 2 {
        0
    } else {
        1u32.checked_shl(bits - 2).unwrap_or(u32::MAX)
    }
}

/// Reserves a free slot of `pool` for sandbox `id`.
pub fn reserve_slot(state_root: &Path, id: &str, pool: Ipv4Net) -> Result<u32, NetError> {
    match crate::procs::reserve_slot(state_root, "net", id, slots(pool)) {
        Ok(Some(slot)) => Ok(slot),
        Ok(None) => Err(NetError::NoSlot(pool)),
        Err((path, e)) => Err(NetError::io("create", path, e)),
    }
}

/// Frees `slot`.
pub fn release_slot(state_root: &Path, slot: u32) {
    let _ = std::fs::remove_file(state_root.join(format!(".net-{slot}")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_30s_and_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let pool: Ipv4Net = "192.0.2.0/29".parse().unwrap();
        assert_eq!(slots(pool), 2);
        let a = reserve_slot(dir.path(), "a", pool).unwrap();
        let b = reserve_slot(dir.path(), "b", pool).unwrap();
        assert_ne!(a, b);
        assert!(matches!(
            reserve_slot(dir.path(), "c", pool),
            Err(NetError::NoSlot(_))
        ));
        release_slot(dir.path(), a);
        assert_eq!(reserve_slot(dir.path(), "c", pool).unwrap(), a);
        let rec = NetRecord::new("x", 1, pool);
        assert_eq!(
            rec.veth_addrs(),
            ("192.0.2.5".parse().unwrap(), "192.0.2.6".parse().unwrap())
        );
    }

    #[test]
    fn names_fit_and_the_mac_is_local_unicast() {
        let rec = NetRecord::new(&"f".repeat(64), 0, "169.254.192.0/18".parse().unwrap());
        assert_eq!(rec.veth.len(), 15);
        assert!(rec.mac.to_string().starts_with("02:"), "{}", rec.mac);
        assert!(!rec.mac.is_multicast());
        let dir = tempfile::tempdir().unwrap();
        rec.write(dir.path()).unwrap();
        assert_eq!(NetRecord::read(dir.path()).unwrap(), Some(rec.clone()));
        rec.remove(dir.path());
        assert_eq!(NetRecord::read(dir.path()).unwrap(), None);
    }
}
