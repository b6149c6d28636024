//! The proxy's own lookups: the IPv4 addresses (A records) an allowed name
//! has, asked of the sandbox's upstream DNS, cached for the records' TTL
//! but at most 60 s, so that the addresses a connection is checked against
//! are the name's current ones.
//!
//! The answers the DNS forwarder relays to the guest for allowed names are
//! learned too ([`Resolver::learn`]): they come from the same upstream, and
//! a name whose servers rotate their addresses would otherwise be refused
//! whenever the guest got other addresses than the proxy's own lookup.
//!
//! CNAME chains are followed within the one answer (at most 8 links); only A
//! records owned by the name or a name it is an alias of count.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use simple_dns::rdata::RData;
use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, RCODE, TYPE};

use super::upstream;

/// The longest an answer is trusted.
pub const MAX_TTL: Duration = Duration::from_secs(60);
/// Names cached at most (expired ones are dropped first, then all).
const MAX_ENTRIES: usize = 1024;
/// Addresses kept per name at most.
const MAX_ADDRS: usize = 64;
/// CNAME links followed at most.
const MAX_CHAIN: usize = 8;

/// A caching A-record resolver over the upstream servers.
#[derive(Debug)]
pub struct Resolver {
    servers: Vec<SocketAddr>,
    cache: Mutex<Cache>,
}

impl Resolver {
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Resolver {
            servers,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The IPv4 addresses of `name` (lowercase, no trailing dot); empty if
    /// it has none or the upstream servers did not answer.
    pub async fn addresses(&self, name: &str) -> Vec<Ipv4Addr> {
        let now = Instant::now();
        if let Some((addrs, until)) = self.lock().get(name) {
            if *until > now {
                return addrs.clone();
            }
        }
        let Some((addrs, ttl)) = self.lookup(name).await else {
            return Vec::new();
        };
        let mut cache = self.lock();
        make_room(&mut cache, now);
        if !addrs.is_empty() {
            cache.insert(name.to_string(), (addrs.clone(), now + ttl.min(MAX_TTL)));
        }
        addrs
    }

    /// Adds the A records of `response`, an upstream answer relayed to the
    /// guest for `name` (lowercase, no trailing dot), to what is cached for
    /// it; the entry then lasts as long as the longer of the two.
    pub fn learn(&self, name: &str, response: &[u8]) {
        let Some((addrs, ttl)) = a_records(response, name) else {
            return;
        };
        if addrs.is_empty() {
            return;
        }
        let now = Instant::now();
        let until = now + ttl.min(MAX_TTL);
        let mut cache = self.lock();
        if let Some((known, known_until)) = cache.get_mut(name) {
            if *known_until > now {
                for a in addrs {
                    if !known.contains(&a) && known.len() < MAX_ADDRS {
                        known.push(a);
                    }
                }
                *known_until = until.max(*known_until);
                return;
            }
        }
        make_room(&mut cache, now);
        cache.insert(name.to_string(), (addrs, until));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn lookup(&self, name: &str) -> Option<(Vec<Ipv4Addr>, Duration)> {
        let id = u16::try_from(getrandom::u32().ok()? & 0xffff).ok()?;
        let mut query = Packet::new_query(id);
        query.set_flags(PacketFlag::RECURSION_DESIRED);
        query.questions.push(Question::new(
            Name::new(name).ok()?,
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let bytes = query.build_bytes_vec().ok()?;
        let answer = upstream::exchange(&bytes, &self.servers).await?;
        a_records(&answer, name)
    }
}

type Cache = HashMap<String, (Vec<Ipv4Addr>, Instant)>;

/// Room for one more name: the expired ones dropped, or all if none is.
fn make_room(cache: &mut Cache, now: Instant) {
    if cache.len() >= MAX_ENTRIES {
        cache.retain(|_, (_, until)| *until > now);
        if cache.len() >= MAX_ENTRIES {
            cache.clear();
        }
    }
}

/// The A records for `name` in a DNS response, and the least TTL among the
/// records used; `None` for a response that is not a successful answer to
/// a question for `name`.
pub fn a_records(response: &[u8], name: &str) -> Option<(Vec<Ipv4Addr>, Duration)> {
    let packet = Packet::parse(response).ok()?;
    if !packet.has_flags(PacketFlag::RESPONSE) || packet.rcode() != RCODE::NoError {
        return None;
    }
    let [question] = &packet.questions[..] else {
        return None;
    };
    if !text(&question.qname)?.eq_ignore_ascii_case(name) {
        return None;
    }
    let mut names = vec![name.to_ascii_lowercase()];
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        let next = packet.answers.iter().find_map(|rr| match &rr.rdata {
            RData::CNAME(target) if owned_by(&rr.name, &names) => {
                let target = text(&target.0)?.to_ascii_lowercase();
                (!names.contains(&target)).then_some((target, rr.ttl))
            }
            _ => None,
        });
        let Some((target, link_ttl)) = next else {
            break;
        };
        ttl = ttl.min(link_ttl);
        names.push(target);
    }
    let mut addrs = Vec::new();
    for rr in &packet.answers {
        if let RData::A(a) = &rr.rdata {
            if owned_by(&rr.name, &names) {
                addrs.push(Ipv4Addr::from(a.address));
                ttl = ttl.min(rr.ttl);
            }
        }
    }
    Some((addrs, Duration::from_secs(u64::from(ttl))))
}

fn owned_by(owner: &Name, names: &[String]) -> bool {
    text(owner).is_some_and(|o| names.iter().any(|n| n.eq_ignore_ascii_case(&o)))
}

/// A name as dotted text; `None` if a label holds a dot or a byte that is
/// not printable ASCII (the text would then stand for another name).
pub fn text(name: &Name) -> Option<String> {
    let mut out = String::new();
    for label in name.as_bytes() {
        if label.iter().any(|&b| b == b'.' || !b.is_ascii_graphic()) {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(std::str::from_utf8(label).ok()?);
    }
    Some(out)
}

#[cfg(test)]
mod tests;
