//! The host's parsers of user files: the runtime's TOML config (parsed and
//! validated) and an OCI runtime spec (`airlock run --spec`, the shim's
//! bundle), loaded and turned into the guest's container spec.

use airlock_runtime::config::RuntimeConfig;
use airlock_runtime::sandbox::spec;

/// The first byte picks the parser; the rest is the file.
pub fn oci_spec_and_config(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(text) = std::str::from_utf8(body) {
            if let Ok(config) = RuntimeConfig::parse(text) {
                let _ = config.validate();
            }
        }
        return;
    }
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("config.json");
    if std::fs::write(&path, body).is_err() {
        return;
    }
    if let Ok(base) = spec::load(&path) {
        let opts = spec::ProcessOptions {
            args: vec!["true".into()],
            ..Default::default()
        };
        let _ = spec::container_spec(Some(base), "fuzz", &opts, &Default::default());
    }
}
