#!/bin/sh
# install.sh: puts Airlock on a Kubernetes node, in the manner of
# kata-deploy. Run by the installer DaemonSet (installer.yaml) with the
# node's root filesystem at $HOST_ROOT (default /host), or by hand.
#
#   install.sh [--host-root DIR] [--artifacts DIR] [--no-restart] [--no-kvm-check]
#              install|uninstall
#
# install: copies the binaries and the guest artifacts from --artifacts
# (default: the dir this script is in) to $HOST_ROOT/opt/airlock, links the
# shim into $HOST_ROOT/usr/local/bin, writes /opt/airlock/etc/airlock.toml,
# adds the `airlock` runtime handler to $HOST_ROOT/etc/containerd/config.toml
# (once; the old file is kept as config.toml.airlock-backup) and restarts
# containerd on the host. uninstall undoes all of it.
set -eu

HOST_ROOT=/host
ARTIFACTS=$(cd "$(dirname "$0")" && pwd)
RESTART=1
KVM_CHECK=1
say() { printf 'airlock-install: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

while [ $# -gt 0 ]; do
  case $1 in
    --host-root) HOST_ROOT=$2; shift 2 ;;
    --artifacts) ARTIFACTS=$2; shift 2 ;;
    --no-restart) RESTART=0; shift ;;
    --no-kvm-check) KVM_CHECK=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    install|uninstall) ACTION=$1; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ -n "${ACTION:-}" ] || die "say install or uninstall (see --help)"
[ -d "$HOST_ROOT" ] || die "host root $HOST_ROOT is not a directory"

DEST=$HOST_ROOT/opt/airlock
CONFIG=$HOST_ROOT/etc/containerd/config.toml
BEGIN='# --- airlock runtime (deploy/install.sh) ---'
END='# --- end airlock ---'

# The config version decides the CRI plugin's name (containerd 2.x: 3).
snippet() {
  if grep -q '^version *= *3' "$CONFIG" 2>/dev/null; then
    plugin='io.containerd.cri.v1.runtime'
  else
    plugin='io.containerd.grpc.v1.cri'
  fi
  cat <<EOT
$BEGIN
[plugins."$plugin".containerd.runtimes.airlock]
  runtime_type = "io.containerd.airlock.v2"
  pod_annotations = ["io.airlock.*"]
  [plugins."$plugin".containerd.runtimes.airlock.options]
    ConfigPath = "/opt/airlock/etc/airlock.toml"
$END
EOT
}

restart_containerd() {
  [ "$RESTART" = 1 ] || return 0
  if command -v nsenter >/dev/null && nsenter -t 1 -m -- true 2>/dev/null; then
    nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd ||
      die "cannot restart containerd on the host (systemctl restart containerd)"
  else
    say "not restarting containerd: run 'systemctl restart containerd' on the node"
  fi
}

install() {
  for f in airlock-vmm airlock-netfilter containerd-shim-airlock-v2 airlock guest/vmlinux guest/initramfs.cpio; do
    [ -f "$ARTIFACTS/$f" ] || die "$ARTIFACTS/$f is missing: build the installer with deploy/build-installer"
  done
  if [ "$KVM_CHECK" = 1 ] && [ ! -c "$HOST_ROOT/dev/kvm" ]; then
    die "no /dev/kvm on this node: Airlock needs hardware virtualisation (VT-x/AMD-V)"
  fi
  mkdir -p "$DEST/bin" "$DEST/guest" "$DEST/images" "$DEST/etc" "$HOST_ROOT/usr/local/bin"
  for f in airlock-vmm airlock-netfilter containerd-shim-airlock-v2 airlock; do
    cp "$ARTIFACTS/$f" "$DEST/bin/$f.new" && mv -f "$DEST/bin/$f.new" "$DEST/bin/$f"
  done
  cp "$ARTIFACTS/guest/vmlinux" "$ARTIFACTS/guest/initramfs.cpio" "$DEST/guest/"
  if [ -d "$ARTIFACTS/images" ]; then
    cp "$ARTIFACTS"/images/*.ext4 "$DEST/images/" 2>/dev/null || true
  fi
  cat >"$DEST/etc/airlock.toml" <<EOT
# Written by deploy/install.sh.
vmm_binary = "/opt/airlock/bin/airlock-vmm"
kernel = "/opt/airlock/guest/vmlinux"
initrd = "/opt/airlock/guest/initramfs.cpio"
image_dir = "/opt/airlock/images"
EOT
  ln -sf /opt/airlock/bin/containerd-shim-airlock-v2 "$HOST_ROOT/usr/local/bin/containerd-shim-airlock-v2"
  mkdir -p "$(dirname "$CONFIG")"
  touch "$CONFIG"
  if grep -qF "$BEGIN" "$CONFIG"; then
    say "containerd already knows the airlock runtime"
  else
    cp "$CONFIG" "$CONFIG.airlock-backup"
    { printf '\n'; snippet; } >>"$CONFIG"
    say "added the airlock runtime to $CONFIG"
    restart_containerd
  fi
  say "installed in $DEST"
}

uninstall() {
  if [ -f "$CONFIG" ] && grep -qF "$BEGIN" "$CONFIG"; then
    awk -v b="$BEGIN" -v e="$END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' \
      "$CONFIG" >"$CONFIG.airlock-tmp" && mv -f "$CONFIG.airlock-tmp" "$CONFIG"
    restart_containerd
  fi
  rm -f "$HOST_ROOT/usr/local/bin/containerd-shim-airlock-v2"
  rm -rf "$DEST"
  say "uninstalled"
}

"$ACTION"
