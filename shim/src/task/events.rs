//! Task events to containerd: [`Event`]s from the pod, turned into
//! containerd's event messages and published on their topics.

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::ttrpc::context::Context;

use crate::pod::Event;

/// Publishes every event from `rx` until the pod goes away.
pub async fn forward(
    publisher: RemotePublisher,
    namespace: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    while let Some(e) = rx.recv().await {
        let (topic, msg) = message(e);
        if let Err(err) = publisher
            .publish(Context::default(), &topic, &namespace, msg)
            .await
        {
            log::warn!("cannot publish {topic}: {err}");
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
    use super::*;
    use crate::process::Exited;

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
