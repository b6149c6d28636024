//! Where the shim's log lines go. The shim and the runtime log with
//! `tracing`.
//!
//! * The daemon: containerd-shim installs a `log` logger on the `log` FIFO
//!   that containerd reads; `tracing`'s `log` feature turns every event of
//!   the shim and the runtime (teardown warnings included) into a record
//!   for it, as no `tracing` subscriber is installed there.
//! * `delete` ([`for_delete`]): warnings and errors to its stderr, which
//!   containerd logs ("cleanup warnings"), and everything to the cleanup
//!   log, which the operator reads after containerd removed the bundle.
//! * The detached cleanup ([`to_writer`]): to its stderr, the cleanup log.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

/// Sends this process's log lines, `tracing` events and `log` records
/// (containerd-shim's), at info level and up, to `writer`.
pub fn to_writer<W>(writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // Only fails if logging was set up already.
    let _ = tracing_subscriber::registry()
        .with(file_layer(writer))
        .try_init();
}

/// `delete`'s logging: warnings and errors to stderr (containerd logs
/// them), all of it to `log` too when there is one.
pub fn for_delete(log: Option<std::fs::File>) {
    let file = log.map(|f| file_layer(std::sync::Mutex::new(f)));
    let _ = tracing_subscriber::registry()
        .with(stderr_layer(std::io::stderr))
        .with(file)
        .try_init();
}

fn file_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .with_filter(LevelFilter::INFO)
}

fn stderr_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .without_time()
        .with_filter(LevelFilter::WARN)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A `log` logger that keeps what it gets.
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {}", record.level(), record.args()));
        }
        fn flush(&self) {}
    }

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    // One test, in this order: a `tracing` subscriber, once set (even for
    // a scope), ends the bridge to `log` for the whole process.
    #[test]
    fn events_reach_containerds_logger_and_deletes_stderr() {
        // The daemon: no subscriber, containerd-shim's `log` logger.
        let seen = Arc::new(Mutex::new(Vec::new()));
        log::set_boxed_logger(Box::new(Capture(seen.clone()))).unwrap();
        log::set_max_level(log::LevelFilter::Info);
        tracing::warn!(id = "0123", "the VMM logged no memory wipe");
        tracing::debug!("below the level containerd asked for");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with("WARN the VMM logged no memory wipe"),
            "{seen:?}"
        );
        assert!(seen[0].contains("0123"), "{seen:?}");

        // `delete`: stderr gets warnings and up, the cleanup log info too.
        let (stderr, file) = (Buffer::default(), Buffer::default());
        let (e, f) = (stderr.clone(), file.clone());
        let subscriber = tracing_subscriber::registry()
            .with(stderr_layer(move || e.clone()))
            .with(file_layer(move || f.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("cleaning up microVM 0123 after a dead shim");
            tracing::error!("cannot clean up microVM 0123: its VMM may still run");
        });
        let (stderr, file) = (stderr.text(), file.text());
        assert!(!stderr.contains("cleaning up"), "{stderr}");
        assert!(stderr.contains("ERROR"), "{stderr}");
        assert!(stderr.contains("its VMM may still run"), "{stderr}");
        assert!(file.contains("cleaning up microVM 0123"), "{file}");
        assert!(file.contains("its VMM may still run"), "{file}");
    }
}
