//! Whether this host can give sandboxes a network: `airlock doctor`'s
//! network lines, and the first check of `--net egress`, so that a
//! missing piece is named before anything is made.

use std::path::Path;
use std::process::Command;

use super::NetError;

/// What `--net egress` needs: a tun device, iproute2, and nftables.
pub fn check_egress() -> Result<String, NetError> {
    if !Path::new("/dev/net/tun").exists() {
        return Err(NetError::Unsupported(
            "no /dev/net/tun: load the tun module (modprobe tun)".into(),
        ));
    }
    program("ip", "iproute2")?;
    program("nft", "nftables")?;
    if !module("nf_tables") {
        return Err(NetError::Unsupported(
            "no nf_tables in this kernel: load it (modprobe nf_tables) or use a kernel with \
             CONFIG_NF_TABLES"
                .into(),
        ));
    }
    for m in ["nft_nat", "nft_masq", "nf_conntrack", "veth"] {
        if !module(m) {
            return Err(NetError::Unsupported(format!(
                "the kernel module {m} is missing (modprobe {m}): --net egress needs it"
            )));
        }
    }
    Ok("tun, veth, nf_tables (NAT, conntrack), ip, nft".into())
}

/// What a pod's NIC in its CNI namespace needs: tc's ingress qdisc and
/// mirred redirect.
pub fn check_pods() -> Result<String, NetError> {
    program("tc", "iproute2")?;
    for m in ["sch_ingress", "act_mirred", "cls_matchall"] {
        if !module(m) {
            return Err(NetError::Unsupported(format!(
                "the kernel module {m} is missing (modprobe {m}): pod networking needs tc \
                 redirect (sch_ingress, act_mirred, cls_matchall)"
            )));
        }
    }
    Ok("tc redirect (sch_ingress, act_mirred, cls_matchall)".into())
}

/// `name` on $PATH, else in /usr/sbin or /sbin (where Debian puts `ip`,
/// `nft` and `tc`, not always on a user's $PATH).
pub fn tool(name: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| name.into())
}

/// `name` is found ([`tool`]), else an error naming its Debian package.
fn program(name: &str, package: &str) -> Result<(), NetError> {
    match tool(name).is_absolute() {
        true => Ok(()),
        false => Err(NetError::Unsupported(format!(
            "{name} not found: install {package} (apt-get install {package})"
        ))),
    }
}

/// The kernel has `name`: loaded or built in (/sys/module), or loadable.
fn module(name: &str) -> bool {
    if Path::new("/sys/module").join(name).exists() {
        return true;
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let builtin = Path::new("/lib/modules")
        .join(&release)
        .join("modules.builtin");
    let needle = format!("/{name}.ko");
    if std::fs::read_to_string(builtin).is_ok_and(|t| t.lines().any(|l| l.ends_with(&needle))) {
        return true;
    }
    Command::new("modprobe")
        .args(["-n", "-q", name])
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_programs_name_their_package() {
        let e = program("airlock-no-such-program", "somepkg").unwrap_err();
        assert!(
            e.to_string().ends_with(
                "airlock-no-such-program not found: install somepkg (apt-get install somepkg)"
            ),
            "{e}"
        );
        assert!(program("sh", "dash").is_ok());
    }
}
