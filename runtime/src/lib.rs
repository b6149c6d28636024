//! `airlock-runtime`: starts and tears down Airlock sandboxes on the host.
