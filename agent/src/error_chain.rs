//! One line for an error and its causes.

/// Formats an error and its sources as `outer: inner: innermost`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::mounts::MountError;
    use crate::init::InitError;

    #[test]
    fn error_chain_joins_sources() {
        let err = InitError::Mounts(MountError::Mount("proc", "/proc", nix::errno::Errno::EPERM));
        assert_eq!(
            error_chain(&err),
            "Cannot mount the base filesystems: Cannot mount proc on /proc: \
             EPERM: Operation not permitted"
        );
    }
}
