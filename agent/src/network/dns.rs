//! The sandbox's `resolv.conf` and `hosts`: written by the agent to files
//! of its own, which every container gets bind-mounted read-only at
//! `/etc/resolv.conf` and `/etc/hosts` (see `container/spec.rs`), so that
//! all of a sandbox's containers resolve names alike, as a pod's do.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The file names, in the agent's directory and in containers' `/etc`.
pub const RESOLV_CONF: &str = "resolv.conf";
pub const HOSTS: &str = "hosts";

/// Errors writing the files.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot write {0}: is the guest's /run writable?")]
    Write(PathBuf, #[source] std::io::Error),
}

/// `resolv.conf` for `nameservers` and `search` domains (both checked:
/// no spaces or newlines); empty when both are.
pub fn resolv_conf(nameservers: &[IpAddr], search: &[String]) -> String {
    let mut out = String::new();
    for ns in nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    out
}

/// `hosts`: localhost, and `hostname` (checked) on `address` (the VM's
/// first address; else the loopback, as Debian's `127.0.1.1` convention).
pub fn hosts(hostname: Option<&str>, address: Option<Ipv4Addr>) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n");
    if let Some(name) = hostname {
        let at = address.unwrap_or(Ipv4Addr::new(127, 0, 1, 1));
        out.push_str(&format!("{at}\t{name}\n"));
    }
    out
}

/// Writes `contents` to `dir/name`, 0644, replacing it whole (a new file
/// renamed over the old one: a reader never sees half of it).
pub fn write(dir: &Path, name: &str, contents: &str) -> Result<(), DnsError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.new"));
    let err = |e| DnsError::Write(path.clone(), e);
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_lists_nameservers_then_search() {
        let ns = ["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let search = ["a.example".to_string(), "b.example".to_string()];
        assert_eq!(
            resolv_conf(&ns, &search),
            "nameserver 10.0.0.1\nnameserver 2001:db8::1\nsearch a.example b.example\n"
        );
        assert_eq!(resolv_conf(&[], &[]), "");
    }

    #[test]
    fn hosts_has_localhost_and_the_hostname() {
        assert_eq!(hosts(None, None), "127.0.0.1\tlocalhost\n");
        assert_eq!(
            hosts(Some("box"), Some(Ipv4Addr::new(10, 0, 0, 2))),
            "127.0.0.1\tlocalhost\n10.0.0.2\tbox\n"
        );
        assert!(hosts(Some("box"), None).ends_with("127.0.1.1\tbox\n"));
    }

    #[test]
    fn write_replaces_the_file_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("net");
        write(&net, HOSTS, "one\n").unwrap();
        write(&net, HOSTS, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(net.join(HOSTS)).unwrap(), "two\n");
        let names: Vec<_> = std::fs::read_dir(&net).unwrap().collect();
        assert_eq!(names.len(), 1);
        // A directory in the way is an error that names the file.
        std::fs::create_dir(net.join(".resolv.conf.new")).unwrap();
        let err = write(&net, RESOLV_CONF, "").unwrap_err();
        assert!(err.to_string().contains("resolv.conf"), "{err}");
    }
}
