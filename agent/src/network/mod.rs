//! The VM's network, as `ConfigureNetwork` sets it: the NIC the VMM gave
//! the guest (named, addressed, its MTU set, up), `lo`, the routes, and
//! the DNS files every container gets.
//!
//! One network per sandbox, as one per pod: every container shares the
//! VM's network namespace (`container/spec.rs` drops any network namespace
//! a spec asks for), so `localhost` reaches the other containers, and the
//! isolation is the VM's. The network is fixed for the VM's life: it may be
//! configured once, before the first container; the host enforces its
//! policy outside the guest anyway.
//!
//! * `config.rs`: the request checked into a [`Config`];
//! * `link.rs`: applying it through rtnetlink (the `Guest` machine);
//! * `dns.rs`: `resolv.conf` and `hosts`.

pub mod config;
pub mod dns;
pub mod link;

use tokio::sync::Mutex;

pub use config::{Config, ConfigError};
use dns::DnsError;
pub use link::LinkError;

use crate::machine::Machine;

/// Errors of `ConfigureNetwork`, and of writing the DNS files.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network configuration")]
    Config(#[from] ConfigError),
    #[error("the network is already configured: ConfigureNetwork is called once per VM")]
    AlreadyConfigured,
    #[error(
        "a container was created already: call ConfigureNetwork before the first \
         CreateContainer (the network is fixed for the VM's life)"
    )]
    Sealed,
    #[error("cannot configure the guest's network")]
    Link(#[from] LinkError),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("cannot set the hostname")]
    Hostname(#[source] nix::Error),
}

/// Where the sandbox's network stands.
#[derive(Default)]
pub struct Network {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// `ConfigureNetwork` succeeded.
    configured: bool,
    /// A container was asked for: no configuring from now on.
    sealed: bool,
    /// The hostname `CreateSandbox` set, for `hosts`.
    hostname: Option<String>,
}

impl Network {
    /// Remembers the hostname `CreateSandbox` set, for `hosts` (a
    /// `ConfigureNetwork` that names one wins).
    pub async fn set_hostname(&self, name: &str) {
        self.state.lock().await.hostname = Some(name.to_string());
    }

    /// Applies `config` to `machine` and writes the DNS files; once, and
    /// only before [`Network::seal`].
    pub async fn configure(
        &self,
        machine: &dyn Machine,
        config: Config,
    ) -> Result<(), NetworkError> {
        let mut state = self.state.lock().await;
        if state.sealed {
            return Err(NetworkError::Sealed);
        }
        if state.configured {
            return Err(NetworkError::AlreadyConfigured);
        }
        machine.configure_network(&config)?;
        if let Some(name) = &config.hostname {
            machine.set_hostname(name).map_err(NetworkError::Hostname)?;
            state.hostname = Some(name.clone());
        }
        let address = config
            .interfaces
            .first()
            .and_then(|i| i.addresses.first())
            .map(|&(ip, _)| ip);
        let dir = machine.net_dir();
        dns::write(
            dir,
            dns::RESOLV_CONF,
            &dns::resolv_conf(&config.nameservers, &config.search),
        )?;
        dns::write(
            dir,
            dns::HOSTS,
            &dns::hosts(state.hostname.as_deref(), address),
        )?;
        state.configured = true;
        Ok(())
    }

    /// Fixes the network before a container is created: from now on
    /// [`Network::configure`] fails. Without a configuration, brings `lo`
    /// up (an empty [`Config`]: the containers still reach each other on
    /// `localhost`) and writes the DNS files a container mounts: no
    /// nameserver, and `hosts` with localhost and the hostname.
    pub async fn seal(&self, machine: &dyn Machine) -> Result<(), NetworkError> {
        let mut state = self.state.lock().await;
        if state.sealed {
            return Ok(());
        }
        if !state.configured {
            machine.configure_network(&Config::default())?;
            let dir = machine.net_dir();
            dns::write(dir, dns::RESOLV_CONF, "")?;
            dns::write(
                dir,
                dns::HOSTS,
                &dns::hosts(state.hostname.as_deref(), None),
            )?;
        }
        state.sealed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex as StdMutex};

    use airlock_protocol::agent::{self, ConfigureNetworkRequest};
    use airlock_protocol::NETWORK_CONFIG_VERSION;

    use super::*;
    use crate::machine::Fake;

    fn fake() -> (tempfile::TempDir, Fake, Arc<StdMutex<Vec<Config>>>) {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::new(dir.path()).unwrap();
        let log = fake.network_log();
        (dir, fake, log)
    }

    fn config(mac: &str) -> Config {
        Config::parse(&ConfigureNetworkRequest {
            version: NETWORK_CONFIG_VERSION,
            interfaces: vec![agent::Interface {
                mac: mac.into(),
                addresses: vec!["10.0.0.2/24".into()],
                ..Default::default()
            }],
            nameservers: vec!["10.0.0.1".into()],
            hostname: "box".into(),
            ..Default::default()
        })
        .unwrap()
    }

    fn read(fake: &Fake, name: &str) -> String {
        std::fs::read_to_string(fake.net_dir().join(name)).unwrap()
    }

    #[tokio::test]
    async fn configured_once_then_refused() {
        let (_dir, fake, log) = fake();
        let net = Network::default();
        net.set_hostname("sandbox-id").await;
        net.configure(&fake, config(Fake::NIC_MAC)).await.unwrap();
        assert_eq!(log.lock().unwrap().as_slice(), [config(Fake::NIC_MAC)]);
        assert_eq!(read(&fake, dns::RESOLV_CONF), "nameserver 10.0.0.1\n");
        assert_eq!(
            read(&fake, dns::HOSTS),
            "127.0.0.1\tlocalhost\n10.0.0.2\tbox\n"
        );
        let again = net.configure(&fake, config(Fake::NIC_MAC)).await;
        assert!(
            matches!(again, Err(NetworkError::AlreadyConfigured)),
            "{again:?}"
        );
        // Sealing keeps the configured files.
        net.seal(&fake).await.unwrap();
        assert_eq!(read(&fake, dns::RESOLV_CONF), "nameserver 10.0.0.1\n");
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn after_a_container_the_network_is_fixed_with_default_files() {
        let (_dir, fake, log) = fake();
        let net = Network::default();
        net.set_hostname("sandbox-id").await;
        net.seal(&fake).await.unwrap();
        assert_eq!(read(&fake, dns::RESOLV_CONF), "");
        assert_eq!(
            read(&fake, dns::HOSTS),
            "127.0.0.1\tlocalhost\n127.0.1.1\tsandbox-id\n"
        );
        let late = net.configure(&fake, config(Fake::NIC_MAC)).await;
        assert!(matches!(late, Err(NetworkError::Sealed)), "{late:?}");
        // Only the loopback was configured, once.
        net.seal(&fake).await.unwrap();
        assert_eq!(log.lock().unwrap().as_slice(), [Config::default()]);
    }

    #[tokio::test]
    async fn an_unknown_mac_changes_nothing_and_may_be_corrected() {
        let (_dir, fake, log) = fake();
        let net = Network::default();
        let err = net
            .configure(&fake, config("02:00:00:00:00:99"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, NetworkError::Link(LinkError::UnknownMac(..))),
            "{err:?}"
        );
        assert!(!fake.net_dir().join(dns::HOSTS).exists());
        net.configure(&fake, config(Fake::NIC_MAC)).await.unwrap();
        assert_eq!(log.lock().unwrap().len(), 1);
    }
}
