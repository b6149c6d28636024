use std::sync::Arc;
use std::time::Duration;

use protobuf::Message;

use super::agent::{
    CheckRequest, CheckResponse, ConfigureNetworkRequest, CreateContainerRequest, FileInfo,
    FileType, Interface, ListDirResponse, ReadStreamResponse, Rootfs, Route, WaitProcessResponse,
    WriteFileRequest,
};
use super::agent_ttrpc::{create_agent_service, AgentService, AgentServiceClient};
use super::*;

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(msg: &M) {
    let bytes = msg.write_to_bytes().expect("encode");
    let back = M::parse_from_bytes(&bytes).expect("decode");
    assert_eq!(&back, msg);
}

#[test]
fn messages_round_trip() {
    round_trip(&CheckResponse {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "0.1.0".into(),
        ..Default::default()
    });
    round_trip(&CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec: br#"{"ociVersion":"1.0.2"}"#.to_vec(),
        rootfs: protobuf::MessageField::some(Rootfs {
            source: "/dev/vdb".into(),
            fstype: "ext4".into(),
            options: vec!["ro".into(), "noatime".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    round_trip(&WaitProcessResponse {
        exit_status: 137,
        signal: 9,
        oom_killed: true,
        ..Default::default()
    });
    round_trip(&ReadStreamResponse {
        data: (0..=255u8).collect(),
        eof: true,
        ..Default::default()
    });
    round_trip(&WriteFileRequest {
        path: "/work/out.txt".into(),
        offset: u64::MAX,
        data: b"hello".to_vec(),
        create: true,
        truncate: true,
        mode: 0o600,
        ..Default::default()
    });
    round_trip(&ListDirResponse {
        entries: vec![FileInfo {
            name: "link".into(),
            file_type: FileType::FILE_TYPE_SYMLINK.into(),
            mtime_seconds: -1,
            link_target: "/etc/hostname".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
}

#[test]
fn the_network_configuration_round_trips_in_one_message() {
    let req = ConfigureNetworkRequest {
        version: NETWORK_CONFIG_VERSION,
        interfaces: vec![Interface {
            mac: "02:00:00:00:00:01".into(),
            name: "eth0".into(),
            addresses: vec!["10.0.0.2/24".into(), "10.0.1.2/16".into()],
            mtu: 1500,
            ..Default::default()
        }],
        routes: vec![
            Route {
                gateway: "10.0.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            },
            Route {
                destination: "10.2.0.0/16".into(),
                device: "eth0".into(),
                ..Default::default()
            },
        ],
        nameservers: vec!["10.0.0.1".into(), "2001:db8::1".into()],
        search: vec!["svc.cluster.local".into()],
        hostname: "sandbox".into(),
        ..Default::default()
    };
    round_trip(&req);
    // The bytes hold every field: nothing is dropped on the way.
    let bytes = req.write_to_bytes().unwrap();
    let back = ConfigureNetworkRequest::parse_from_bytes(&bytes).unwrap();
    assert_eq!(back.interfaces[0].addresses.len(), 2);
    assert_eq!(back.routes[1].destination, "10.2.0.0/16");
    assert_eq!(back.version, 1);
}

#[test]
fn check_compatible_accepts_same_version() {
    assert_eq!(check_compatible(PROTOCOL_VERSION), Ok(()));
}

#[test]
fn check_compatible_rejects_other_versions() {
    let err = check_compatible(1).unwrap_err();
    assert_eq!(err, VersionError { theirs: 1, ours: 2 });
    assert_eq!(
        err.to_string(),
        "agent speaks protocol version 1, this runtime speaks 2: \
         upgrade the guest image or the runtime"
    );
    assert!(check_compatible(0).is_err());
}

struct CheckOnly;

#[async_trait::async_trait]
impl AgentService for CheckOnly {
    async fn check(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: CheckRequest,
    ) -> ttrpc::Result<CheckResponse> {
        if let Err(e) = check_compatible(req.protocol_version) {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                e.to_string(),
            )));
        }
        Ok(CheckResponse {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test-agent".into(),
            ..Default::default()
        })
    }
}

#[tokio::test(flavor = "current_thread")]
async fn ttrpc_server_and_client_talk_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("agent.sock").display());

    let service = create_agent_service(Arc::new(CheckOnly));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&addr)
        .unwrap()
        .register_service(service);
    server.start().await.unwrap();

    let client = AgentServiceClient::new(ttrpc::r#async::Client::connect(&addr).await.unwrap());
    let ctx = || ttrpc::context::with_timeout(Duration::from_secs(5).as_nanos() as i64);

    let resp = client
        .check(
            ctx(),
            &CheckRequest {
                protocol_version: PROTOCOL_VERSION,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(resp.agent_version, "test-agent");
    check_compatible(resp.protocol_version).unwrap();

    // A mismatched peer gets a clear error back.
    let err = client
        .check(
            ctx(),
            &CheckRequest {
                protocol_version: PROTOCOL_VERSION + 1,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("upgrade the guest image"), "{err}");

    // Methods the server does not implement answer NOT_FOUND/UNIMPLEMENTED.
    let err = client.stat(ctx(), &Default::default()).await.unwrap_err();
    assert!(matches!(err, ttrpc::Error::RpcStatus(_)), "{err}");

    server.shutdown().await.unwrap();
}
