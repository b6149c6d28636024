//! How Airlock prints an error on one line: the error, then each cause,
//! joined by ": " (the way `anyhow` prints `{:#}`). Every binary of the
//! workspace uses this one printer, so that a cause is never lost and
//! never printed twice.

/// `err` and its causes on one line.
///
/// ```
/// let io = std::io::Error::other("disk full");
/// let e = airlock_vmm_api::LoadError::Read("/vm.json".into(), io);
/// assert_eq!(
///     airlock_vmm_api::report::chain(&e),
///     "cannot read the VM configuration /vm.json: disk full"
/// );
/// ```
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let next = e.to_string();
        // A `#[error(transparent)]` or "{0}" wrapper already printed it.
        if !msg.ends_with(&next) {
            msg.push_str(": ");
            msg.push_str(&next);
        }
        source = e.source();
    }
    msg
}
