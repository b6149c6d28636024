//! The agent's request decoding: a ttrpc request's payload, decoded as the
//! agent decodes it (protobuf, by method), and the JSON it carries (an OCI
//! spec, a process spec, resources) parsed as the agent parses it.

use airlock_protocol::agent;
use airlock_protocol::protobuf::Message;
use oci_spec::runtime::{LinuxResources, Process, Spec};

/// The first byte picks the method; the rest is its request's bytes.
pub fn agent_request(data: &[u8]) {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    match method % 20 {
        0 => decode::<agent::CheckRequest>(body),
        1 => decode::<agent::CreateSandboxRequest>(body),
        2 => decode::<agent::DestroySandboxRequest>(body),
        3 => {
            if let Ok(req) = agent::CreateContainerRequest::parse_from_bytes(body) {
                let _ = serde_json::from_slice::<Spec>(&req.oci_spec);
            }
        }
        4 => decode::<agent::StartContainerRequest>(body),
        5 => decode::<agent::RemoveContainerRequest>(body),
        6 => decode::<agent::StatsContainerRequest>(body),
        7 => {
            if let Ok(req) = agent::UpdateContainerRequest::parse_from_bytes(body) {
                let _ = serde_json::from_slice::<LinuxResources>(&req.resources);
            }
        }
        8 => {
            if let Ok(req) = agent::ExecProcessRequest::parse_from_bytes(body) {
                let _ = serde_json::from_slice::<Process>(&req.process_spec);
            }
        }
        9 => decode::<agent::WaitProcessRequest>(body),
        10 => decode::<agent::SignalProcessRequest>(body),
        11 => decode::<agent::ReadStreamRequest>(body),
        12 => decode::<agent::WriteStreamRequest>(body),
        13 => decode::<agent::CloseStdinRequest>(body),
        14 => decode::<agent::TtyWinResizeRequest>(body),
        15 => decode::<agent::ReadFileRequest>(body),
        16 => decode::<agent::WriteFileRequest>(body),
        17 => decode::<agent::ListDirRequest>(body),
        18 => decode::<agent::StatRequest>(body),
        _ => {
            decode::<agent::MakeDirRequest>(body);
            decode::<agent::RemoveRequest>(body);
        }
    }
}

fn decode<M: Message>(body: &[u8]) {
    let _ = M::parse_from_bytes(body);
}
