//! The sandbox's DNS server: a UDP forwarder on the guest's gateway address
//! (the guest's resolv.conf names it). It forwards each query to the
//! upstream servers and relays their answer verbatim; when the policy denies
//! all of IPv4, it forwards only names the policy allows and answers every
//! other with REFUSED, so that DNS can be used neither to learn addresses
//! nor to carry data out. Messages that are not one well-formed query are
//! dropped; at most [`MAX_IN_FLIGHT`] queries are forwarded at a time (more
//! are dropped: the client retries).
//!
//! Messages are read with `simple-dns` (not `hickory-proto`): only a query's
//! header and question and a REFUSED reply are needed here, which it does
//! without dependencies; answers are relayed as bytes, never re-encoded.

use std::net::SocketAddr;
use std::sync::Arc;

use simple_dns::{Packet, PacketFlag, RCODE};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use super::ratelimit::RateLimit;
use super::resolver::{text, Resolver};
use super::{upstream, PolicyHandle};

/// Queries being forwarded at most.
pub const MAX_IN_FLIGHT: usize = 64;
/// The largest query read (longer datagrams are cut and then fail to parse).
const MAX_QUERY: usize = 4096;

static REFUSED_LOG: RateLimit = RateLimit::new();

/// The forwarder of one sandbox.
#[derive(Debug, Clone)]
pub struct Forwarder {
    pub socket: Arc<UdpSocket>,
    pub upstream: Arc<[SocketAddr]>,
    pub policy: PolicyHandle,
    /// The proxy's resolver, which learns the answers relayed for allowed
    /// names.
    pub resolver: Arc<Resolver>,
}

/// What to do with one datagram from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a well-formed query: no answer.
    Drop,
    /// This reply (REFUSED) goes back at once.
    Answer(Vec<u8>),
    /// Ask the upstream servers; the name (lowercase, no trailing dot) if
    /// the policy allows it, for the proxy's resolver to learn the answer.
    Forward(Option<String>),
}

impl Forwarder {
    /// Serves until the socket fails.
    pub async fn serve(self) -> std::io::Error {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut buf = vec![0; MAX_QUERY];
        loop {
            let (n, client) = match self.socket.recv_from(&mut buf).await {
                Ok(received) => received,
                // A client's ICMP error on an earlier reply: not ours.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue
                }
                Err(e) => return e,
            };
            let query = buf.get(..n).unwrap_or_default();
            match judge(query, &self.policy) {
                Verdict::Drop => {}
                Verdict::Answer(reply) => {
                    // Best effort, as UDP is: a full socket buffer loses it.
                    let _ = self.socket.try_send_to(&reply, client);
                }
                Verdict::Forward(name) => {
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        continue;
                    };
                    let this = self.clone();
                    let query = query.to_vec();
                    tokio::spawn(async move {
                        if let Some(answer) = upstream::exchange(&query, &this.upstream).await {
                            // Learned first: the guest may connect as soon
                            // as it has the answer.
                            if let Some(name) = name {
                                this.resolver.learn(&name, &answer);
                            }
                            let _ = this.socket.send_to(&answer, client).await;
                        }
                        drop(permit);
                    });
                }
            }
        }
    }
}

/// The verdict on `query` under the policy in force.
pub fn judge(query: &[u8], policy: &PolicyHandle) -> Verdict {
    // Counts first, so that no parser sizes anything by a count the tenant
    // made up: one question, no answers or authority, an OPT (EDNS) and at
    // most one more additional record.
    let count = |i: usize| {
        query
            .get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    if (count(4), count(6), count(8)) != (Some(1), Some(0), Some(0)) || count(10) > Some(2) {
        return Verdict::Drop;
    }
    let Ok(packet) = Packet::parse(query) else {
        return Verdict::Drop;
    };
    if packet.has_flags(PacketFlag::RESPONSE) {
        return Verdict::Drop;
    }
    let [question] = &packet.questions[..] else {
        return Verdict::Drop;
    };
    let policy = policy.get();
    // A label with a dot or an unprintable byte matches no rule.
    let name = text(&question.qname).map(|n| n.to_ascii_lowercase());
    let allowed_name = name.filter(|n| policy.allows_name(n));
    if allowed_name.is_some() || !policy.denies_all_v4() {
        return Verdict::Forward(allowed_name);
    }
    if let Some(suppressed) = REFUSED_LOG.allow() {
        tracing::warn!(
            name = ?question.qname.to_string(), // quoted and escaped: the tenant's bytes
            suppressed,
            "DNS query refused: the name is not allowed by the sandbox's egress policy"
        );
    }
    refused(&packet).map_or(Verdict::Drop, Verdict::Answer)
}

/// A REFUSED reply to `query`, its question repeated.
fn refused(query: &Packet) -> Option<Vec<u8>> {
    let mut reply = Packet::new_reply(query.id());
    *reply.opcode_mut() = query.opcode();
    *reply.rcode_mut() = RCODE::Refused;
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.questions = query.questions.clone();
    reply.build_bytes_vec().ok()
}

#[cfg(test)]
mod tests;
