//! A process that could not be started, as ttrpc Status details: the agent
//! attaches an [`ExecFailure`] to the error status of `CreateContainer` or
//! `ExecProcess`, and the runtime reads its kind instead of matching the
//! message text.
//!
//! Adding details is wire compatible: a peer that does not know them ignores
//! them and still has the status code and message.

use protobuf::Message;
use ttrpc::proto::Any;
use ttrpc::{Code, Status};

use crate::agent::{ExecFailure, ExecFailureKind};

/// The type URL of an [`ExecFailure`] packed in a Status's details.
pub const EXEC_FAILURE_TYPE_URL: &str = "type.googleapis.com/airlock.agent.v1.ExecFailure";

/// An error status with `failure` in its details.
pub fn exec_failure_status(code: Code, message: String, failure: &ExecFailure) -> Status {
    let mut status = ttrpc::get_status(code, message);
    // Encoding a message made of an enum and a string into a Vec cannot fail.
    if let Ok(value) = failure.write_to_bytes() {
        status.details.push(Any {
            type_url: EXEC_FAILURE_TYPE_URL.into(),
            value,
            ..Default::default()
        });
    }
    status
}

/// The [`ExecFailure`] in a status's details, if the peer attached one
/// (a malformed one counts as none).
pub fn exec_failure(status: &Status) -> Option<ExecFailure> {
    status
        .details
        .iter()
        .find(|d| d.type_url == EXEC_FAILURE_TYPE_URL)
        .and_then(|d| ExecFailure::parse_from_bytes(&d.value).ok())
}

impl ExecFailure {
    /// A failure of `kind` to run `executable`.
    pub fn of(kind: ExecFailureKind, executable: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            executable: executable.into(),
            ..Default::default()
        }
    }

    /// The kind; one this build does not know (a newer peer's) is `Other`.
    pub fn kind_or_other(&self) -> ExecFailureKind {
        self.kind
            .enum_value_or(ExecFailureKind::EXEC_FAILURE_KIND_OTHER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_crosses_in_the_details() {
        let failure = ExecFailure::of(ExecFailureKind::EXEC_FAILURE_KIND_NOT_FOUND, "nosuch");
        let status = exec_failure_status(Code::FAILED_PRECONDITION, "no".into(), &failure);
        // As the wire carries it.
        let bytes = status.write_to_bytes().unwrap();
        let back = Status::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back.message, "no");
        assert_eq!(exec_failure(&back), Some(failure));
    }

    #[test]
    fn no_or_other_details_are_no_failure() {
        let mut status = ttrpc::get_status(Code::INTERNAL, "x");
        assert_eq!(exec_failure(&status), None);
        status.details.push(Any {
            type_url: "type.googleapis.com/other".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        });
        assert_eq!(exec_failure(&status), None);
        status.details.push(Any {
            type_url: EXEC_FAILURE_TYPE_URL.into(),
            // A truncated length-delimited field.
            value: vec![0x12, 0x05, b'a'],
            ..Default::default()
        });
        assert_eq!(exec_failure(&status), None);
    }

    #[test]
    fn an_unknown_kind_is_other() {
        let mut failure = ExecFailure::of(ExecFailureKind::EXEC_FAILURE_KIND_NOT_FOUND, "x");
        failure.kind = protobuf::EnumOrUnknown::from_i32(42);
        assert_eq!(
            failure.kind_or_other(),
            ExecFailureKind::EXEC_FAILURE_KIND_OTHER
        );
    }
}
