//! How every Airlock program (VMM, agent, runtime, shim) prints an error:
//! the error, then each cause not already in the text, joined by ": " (the
//! way `anyhow` prints `{:#}`), so that a cause is never lost and never
//! printed twice.
//!
//! Written here rather than taken from a crate: `anyhow` and `eyre` print
//! a chain only for their own error types, and these programs keep one
//! `thiserror` enum per module.
//!
//! ```
//! #[derive(Debug)]
//! struct Outer(std::io::Error);
//! impl std::fmt::Display for Outer {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         write!(f, "cannot read /vm.json")
//!     }
//! }
//! impl std::error::Error for Outer {
//!     fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
//!         Some(&self.0)
//!     }
//! }
//! let e = Outer(std::io::Error::other("disk full"));
//! assert_eq!(airlock_report::chain(&e), "cannot read /vm.json: disk full");
//! ```

/// `err` and its causes on one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let next = e.to_string();
        // A `#[error("...: {0}")]` or transparent wrapper printed it already.
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// [`chain`], with every run of whitespace (newlines included) one space:
/// one line of a terminal or a log.
pub fn one_line(err: &dyn std::error::Error) -> String {
    flatten(&chain(err))
}

/// `text` with every run of whitespace (newlines included) one space.
pub fn flatten(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrap(&'static str, Option<Box<Wrap>>);

    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|w| w as _)
        }
    }

    #[test]
    fn causes_are_joined_once_each() {
        let inner = Wrap("EPERM", None);
        let mid = Wrap("cannot mount proc: EPERM", Some(Box::new(inner)));
        let top = Wrap("cannot mount the base\n  filesystems", Some(Box::new(mid)));
        assert_eq!(
            chain(&top),
            "cannot mount the base\n  filesystems: cannot mount proc: EPERM"
        );
        assert_eq!(
            one_line(&top),
            "cannot mount the base filesystems: cannot mount proc: EPERM"
        );
        assert_eq!(chain(&Wrap("alone", None)), "alone");
    }
}
