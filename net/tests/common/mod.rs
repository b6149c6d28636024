//! What the integration tests share: a fake upstream DNS server on
//! 127.0.0.1 that answers A queries from a fixed table, and a ClientHello
//! builder.

#![allow(dead_code)] // each test binary uses part of it

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, RCODE};
use tokio::net::UdpSocket;

/// A DNS server on 127.0.0.1 that answers A queries for the names in its
/// table (TTL 30 s) and NXDOMAIN for others, counting the queries it got.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub queries: Arc<AtomicUsize>,
    /// The last reply sent, as sent.
    pub last_reply: Arc<Mutex<Vec<u8>>>,
}

impl FakeUpstream {
    pub async fn start(table: &[(&str, &[Ipv4Addr])]) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let table: HashMap<String, Vec<Ipv4Addr>> = table
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_vec()))
            .collect();
        let queries = Arc::new(AtomicUsize::new(0));
        let counter = queries.clone();
        let last_reply = Arc::new(Mutex::new(Vec::new()));
        let last = last_reply.clone();
        tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            loop {
                let (n, from) = socket.recv_from(&mut buf).await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let query = Packet::parse(&buf[..n]).unwrap();
                let mut reply = Packet::new_reply(query.id());
                reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
                let question = query.questions[0].clone();
                match table.get(&question.qname.to_string().to_ascii_lowercase()) {
                    Some(addrs) => {
                        for a in addrs {
                            reply.answers.push(ResourceRecord::new(
                                question.qname.clone(),
                                CLASS::IN,
                                30,
                                RData::A(A {
                                    address: u32::from(*a),
                                }),
                            ));
                        }
                    }
                    None => *reply.rcode_mut() = RCODE::NameError,
                }
                reply.questions.push(question);
                let bytes = reply.build_bytes_vec().unwrap();
                *last.lock().unwrap() = bytes.clone();
                socket.send_to(&bytes, from).await.unwrap();
            }
        });
        FakeUpstream {
            addr,
            queries,
            last_reply,
        }
    }

    pub fn last_reply(&self) -> Vec<u8> {
        self.last_reply.lock().unwrap().clone()
    }

    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

/// A minimal TLS 1.2-style ClientHello record with one server_name
/// extension naming `name`.
pub fn client_hello(name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let be16 = |n: usize| u16::try_from(n).unwrap().to_be_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&be16(name.len() + 3)); // server_name_list
    sni.push(0); // host_name
    sni.extend_from_slice(&be16(name.len()));
    sni.extend_from_slice(name);
    let mut extensions = vec![0, 0]; // server_name
    extensions.extend_from_slice(&be16(sni.len()));
    extensions.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&be16(extensions.len()));
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1, 0];
    handshake.extend_from_slice(&be16(body.len()));
    handshake.extend_from_slice(&body);
    let mut record = vec![22, 3, 1];
    record.extend_from_slice(&be16(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}
