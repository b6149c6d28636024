//! Task events to containerd: [`Event`]s from the pod, turned into
//! containerd's event messages and published on their topics.

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::ttrpc::context;
use std::time::Duration;

use crate::pod::Event;

/// How long containerd has to take one event. The publisher sends events
/// one at a time, each with this deadline (a miss is retried, a few times,
/// later): with none (`Context::default()`), one event containerd never
/// answers would hold back every later one, task exits included.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes every event from `rx` until the pod goes away.
pub async fn forward(
    publisher: RemotePublisher,
    namespace: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    forward_within(publisher, namespace, rx, PUBLISH_TIMEOUT).await
}

/// [`forward`], each event with `limit` to be taken.
async fn forward_within(
    publisher: RemotePublisher,
    namespace: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    limit: Duration,
) {
    let nanos = i64::try_from(limit.as_nanos()).unwrap_or(i64::MAX);
    while let Some(e) = rx.recv().await {
        let (topic, msg) = message(e);
        if let Err(err) = publisher
            .publish(context::with_timeout(nanos), &topic, &namespace, msg)
            .await
        {
            tracing::warn!("cannot publish {topic}: {err}");
        }
    }
}

fn boxed<E: containerd_shim::event::Event + 'static>(e: E) -> (String, Box<dyn MessageDyn>) {
    (e.topic(), Box::new(e))
}

/// The event message and its topic.
fn message(e: Event) -> (String, Box<dyn MessageDyn>) {
    match e {
        Event::Create { id, pid } => boxed(TaskCreate {
            container_id: id,
            pid,
            ..Default::default()
        }),
        Event::Start { id, pid } => boxed(TaskStart {
            container_id: id,
            pid,
            ..Default::default()
        }),
        Event::Exit {
            id,
            exec_id,
            pid,
            exit,
        } => boxed(TaskExit {
            container_id: id,
            id: exec_id,
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        }),
        Event::Delete { id, pid, exit } => boxed(TaskDelete {
            container_id: id.clone(),
            id,
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        }),
        Event::ExecAdded { id, exec_id } => boxed(TaskExecAdded {
            container_id: id,
            exec_id,
            ..Default::default()
        }),
        Event::ExecStarted { id, exec_id, pid } => boxed(TaskExecStarted {
            container_id: id,
            exec_id,
            pid,
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use containerd_shim::protos::api::Empty;
    use containerd_shim::protos::shim::events::ForwardRequest;
    use containerd_shim::protos::shim_async::{create_events, Events};
    use containerd_shim::protos::ttrpc::r#async::{Server, TtrpcContext};

    use super::*;
    use crate::process::Exited;

    /// containerd's event service that never answers its first Forward.
    struct Containerd {
        calls: AtomicUsize,
        got: tokio::sync::mpsc::UnboundedSender<String>,
    }

    #[async_trait::async_trait]
    impl Events for Containerd {
        async fn forward(
            &self,
            _: &TtrpcContext,
            req: ForwardRequest,
        ) -> containerd_shim::protos::ttrpc::Result<Empty> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
            self.got.send(req.envelope().topic.clone()).ok();
            Ok(Empty::new())
        }
    }

    #[tokio::test]
    async fn an_event_containerd_does_not_answer_does_not_hold_back_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("containerd.sock.ttrpc");
        let (got, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let service = create_events(Arc::new(Containerd {
            calls: AtomicUsize::new(0),
            got,
        }));
        let mut server = Server::new()
            .bind(&format!("unix://{}", sock.display()))
            .unwrap()
            .register_service(service);
        server.start().await.unwrap();
        let publisher = RemotePublisher::new(sock.to_str().unwrap()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(forward_within(
            publisher,
            "default".into(),
            rx,
            Duration::from_millis(200),
        ));
        tx.send(Event::Start {
            id: "c".into(),
            pid: 1,
        })
        .unwrap();
        tx.send(Event::Exit {
            id: "c".into(),
            exec_id: "c".into(),
            pid: 1,
            exit: Exited::now(137),
        })
        .unwrap();
        // The first try of the start event hangs; it times out and is
        // retried, and the exit goes through.
        let mut topics = Vec::new();
        while topics.len() < 2 {
            let topic = tokio::time::timeout(Duration::from_secs(10), seen.recv())
                .await
                .expect("an event is stuck behind one containerd never answered")
                .unwrap();
            topics.push(topic);
        }
        topics.sort();
        assert_eq!(topics, ["/tasks/exit", "/tasks/start"]);
    }

    #[test]
    fn each_event_has_its_topic() {
        let exit = Exited::now(3);
        let cases = [
            (
                Event::Create {
                    id: "c".into(),
                    pid: 1,
                },
                "/tasks/create",
            ),
            (
                Event::Start {
                    id: "c".into(),
                    pid: 1,
                },
                "/tasks/start",
            ),
            (
                Event::Exit {
                    id: "c".into(),
                    exec_id: "c".into(),
                    pid: 1,
                    exit,
                },
                "/tasks/exit",
            ),
            (
                Event::Delete {
                    id: "c".into(),
                    pid: 1,
                    exit,
                },
                "/tasks/delete",
            ),
            (
                Event::ExecAdded {
                    id: "c".into(),
                    exec_id: "e".into(),
                },
                "/tasks/exec-added",
            ),
            (
                Event::ExecStarted {
                    id: "c".into(),
                    exec_id: "e".into(),
                    pid: 1,
                },
                "/tasks/exec-started",
            ),
        ];
        for (e, topic) in cases {
            assert_eq!(message(e).0, topic);
        }
    }
}
