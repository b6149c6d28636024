//! The runtime options containerd passes in `CreateTaskRequest.options`:
//! `ConfigPath`, the Airlock runtime config (TOML) to use.
//!
//! containerd's CRI plugin and `ctr --runtime-config-path` send
//! `runtimeoptions.v1.Options { type_url = 1; config_path = 2; config_body = 3 }`.
//! containerd-shim-protos 0.11 ships no Rust type for that message, so its
//! two string fields are read here with protobuf's own decoder.

use std::path::PathBuf;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;

/// Options that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("malformed runtime options ({0}): {1}")]
    Malformed(String, String),
}

/// The options Airlock reads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// `ConfigPath`: the runtime config; empty means the compiled-in defaults.
    pub config_path: Option<PathBuf>,
}

/// Reads `any`; no options (or another runtime's type) mean the defaults.
pub fn parse(any: Option<&Any>) -> Result<RuntimeOptions, OptionsError> {
    let Some(any) = any else {
        return Ok(RuntimeOptions::default());
    };
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return Ok(RuntimeOptions::default());
    }
    let bad =
        |e: &dyn std::fmt::Display| OptionsError::Malformed(any.type_url.clone(), e.to_string());
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut config_path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| bad(&e))? {
        match tag {
            // field 2, length-delimited: config_path
            0x12 => {
                let s = input.read_string().map_err(|e| bad(&e))?;
                if !s.is_empty() {
                    config_path = Some(PathBuf::from(s));
                }
            }
            t => input
                .skip_field(wire_type(t).ok_or_else(|| bad(&format!("bad tag {t:#x}")))?)
                .map_err(|e| bad(&e))?,
        }
    }
    Ok(RuntimeOptions { config_path })
}

fn wire_type(tag: u32) -> Option<containerd_shim::protos::protobuf::rt::WireType> {
    containerd_shim::protos::protobuf::rt::WireType::new(tag & 7)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = value;
        a
    }

    /// `runtimeoptions.v1.Options { type_url: "x", config_path: "/etc/airlock.toml" }`
    fn encoded() -> Vec<u8> {
        let mut v = vec![0x0a, 1, b'x', 0x12, 17];
        v.extend_from_slice(b"/etc/airlock.toml");
        v
    }

    #[test]
    fn config_path_is_read() {
        let a = any("type.googleapis.com/runtimeoptions.v1.Options", encoded());
        assert_eq!(
            parse(Some(&a)).unwrap().config_path,
            Some(PathBuf::from("/etc/airlock.toml"))
        );
    }

    #[test]
    fn absent_or_foreign_options_mean_defaults() {
        assert_eq!(parse(None).unwrap(), RuntimeOptions::default());
        let a = any("type.googleapis.com/containerd.runc.v1.Options", vec![0xff]);
        assert_eq!(parse(Some(&a)).unwrap(), RuntimeOptions::default());
    }

    #[test]
    fn truncated_options_are_an_error() {
        let mut v = encoded();
        v.truncate(8);
        let a = any("type.googleapis.com/runtimeoptions.v1.Options", v);
        let err = parse(Some(&a)).unwrap_err().to_string();
        assert!(err.starts_with("malformed runtime options"), "{err}");
    }
}
