//! The agent's settings on the kernel command line (`airlock.*` parameters).

use std::io;

/// Where the kernel shows its command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

/// Prefix of the parameters the agent reads.
const PREFIX: &str = "airlock.";

/// Errors reading the command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("Cannot read the kernel command line")]
    Read(#[source] io::Error),
}

/// Problems with single parameters; they are reported and then ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamWarning {
    #[error("Ignoring unknown parameter {0}")]
    Unknown(String),
    #[error("Ignoring {0}={1}: the value must be 1 or 0")]
    NotABool(String, String),
}

/// The agent's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// `airlock.oneshot`: reboot (which the VMM treats as a clean exit) as
    /// soon as the agent is ready, instead of serving.
    pub oneshot: bool,
}

impl Cmdline {
    /// Reads and parses /proc/cmdline.
    pub fn read() -> Result<(Self, Vec<ParamWarning>), CmdlineError> {
        let text = std::fs::read_to_string(PROC_CMDLINE).map_err(CmdlineError::Read)?;
        Ok(Self::parse(&text))
    }

    /// Parses a kernel command line. Parameters other than `airlock.*` are
    /// skipped silently; a later parameter overrides an earlier one.
    pub fn parse(text: &str) -> (Self, Vec<ParamWarning>) {
        let mut cmdline = Self::default();
        let mut warnings = Vec::new();
        for word in split_words(text) {
            let Some(param) = word.strip_prefix(PREFIX) else {
                continue;
            };
            let (name, value) = match param.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (param, None),
            };
            match name {
                "oneshot" => match parse_bool(value) {
                    Some(on) => cmdline.oneshot = on,
                    None => warnings.push(ParamWarning::NotABool(
                        format!("{PREFIX}{name}"),
                        value.unwrap_or_default().to_owned(),
                    )),
                },
                _ => warnings.push(ParamWarning::Unknown(word.to_owned())),
            }
        }
        (cmdline, warnings)
    }
}

/// A flag: bare means on, `=1` on, `=0` off.
fn parse_bool(value: Option<&str>) -> Option<bool> {
    match value {
        None | Some("1") => Some(true),
        Some("0") => Some(false),
        Some(_) => None,
    }
}

/// Splits on whitespace, keeping double-quoted spans (`a="b c"`) in one word,
/// as the kernel does. The quotes are kept; `airlock.*` values never need them.
fn split_words(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match (c, start) {
            ('"', _) => {
                quoted = !quoted;
                start.get_or_insert(i);
            }
            (c, Some(s)) if c.is_whitespace() && !quoted => {
                words.push(&text[s..i]);
                start = None;
            }
            (c, None) if !c.is_whitespace() => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push(&text[s..]);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Cmdline, Vec<ParamWarning>) {
        Cmdline::parse(text)
    }

    #[test]
    fn defaults_without_airlock_params() {
        let (c, w) = parse("console=ttyS0 reboot=k,panic_warm panic=-1\n");
        assert_eq!(c, Cmdline::default());
        assert!(w.is_empty());
        assert_eq!(parse(""), (Cmdline::default(), vec![]));
    }

    #[test]
    fn oneshot_bare_and_valued() {
        assert!(parse("console=ttyS0 airlock.oneshot\n").0.oneshot);
        assert!(parse("airlock.oneshot=1").0.oneshot);
        assert!(!parse("airlock.oneshot=0").0.oneshot);
        // The last one wins.
        assert!(!parse("airlock.oneshot airlock.oneshot=0").0.oneshot);
        assert!(parse("airlock.oneshot=0 airlock.oneshot").0.oneshot);
    }

    #[test]
    fn bad_values_and_unknown_params_warn() {
        let (c, w) = parse("airlock.oneshot=yes airlock.frobnicate=3 airlock.x");
        assert!(!c.oneshot);
        assert_eq!(
            w,
            vec![
                ParamWarning::NotABool("airlock.oneshot".into(), "yes".into()),
                ParamWarning::Unknown("airlock.frobnicate=3".into()),
                ParamWarning::Unknown("airlock.x".into()),
            ]
        );
        assert_eq!(
            w[0].to_string(),
            "Ignoring airlock.oneshot=yes: the value must be 1 or 0"
        );
    }

    #[test]
    fn other_params_are_not_ours() {
        let (c, w) = parse("xairlock.oneshot foo.airlock.oneshot airlockoneshot");
        assert!(!c.oneshot);
        assert!(w.is_empty());
    }

    #[test]
    fn quoted_words_stay_whole() {
        assert_eq!(
            split_words("  a=\"x airlock.oneshot\"\tb  \"c d\"e "),
            vec!["a=\"x airlock.oneshot\"", "b", "\"c d\"e"]
        );
        assert!(!parse("dyndbg=\"airlock.oneshot\"").0.oneshot);
    }
}
