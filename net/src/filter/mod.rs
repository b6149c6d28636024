//! `airlock-netfilter`, the host-side enforcement of a sandbox's domain rules:
//! a DNS forwarder ([`dns`]) on the sandbox's gateway address, and a TCP proxy
//! ([`proxy`]) that nft sends every TCP connection to a denied destination,
//! which lets one through only when its TLS SNI ([`sni`]) or HTTP Host
//! ([`http`]) names an allowed domain that resolves ([`resolver`]) to the
//! connection's original destination. [`daemon`] ties them together.

pub mod config;
pub mod daemon;
pub mod dns;
pub mod http;
pub mod netns;
pub mod proxy;
pub mod ratelimit;
pub mod resolver;
pub mod sni;
pub mod upstream;

use std::sync::{Arc, RwLock};

use crate::policy::Policy;

/// What the first bytes of a connection say about the name it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// The name the client asks for (as sent: not yet lowercased or checked).
    Name(String),
    /// No name, or bytes that are not a well-formed ClientHello or request
    /// head: the connection is refused.
    NoName,
}

/// The policy in force, shared by the forwarder and the proxy and replaced
/// as a whole on SIGHUP: each query or connection is judged by one version.
#[derive(Debug, Clone, Default)]
pub struct PolicyHandle(Arc<RwLock<Arc<Policy>>>);

impl PolicyHandle {
    pub fn new(policy: Policy) -> Self {
        PolicyHandle(Arc::new(RwLock::new(Arc::new(policy))))
    }

    /// The policy in force now.
    pub fn get(&self) -> Arc<Policy> {
        // A writer cannot panic while holding the lock (it only swaps an Arc).
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `policy` in force for every later query and connection.
    pub fn set(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }
}
