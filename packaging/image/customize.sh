#!/usr/bin/env bash
# Turns a Debian bookworm arm64 root with the printloop-gateway .deb installed into the root of
# the printloop Raspberry Pi image. Run by scripts/build-image.sh as an mmdebstrap customize hook
# (so /proc, /sys and /dev are mounted in the root and arm64 programs run under qemu-user):
#
#   packaging/image/customize.sh ROOT ROOTPART BOOTPART
#     ROOT      the root directory being built
#     ROOTPART  the root partition as the kernel and fstab name it, e.g. PARTUUID=1234abcd-02
#     BOOTPART  the boot partition, e.g. PARTUUID=1234abcd-01
#
# Everything the image adds is here or in rootfs/ beside this script (copied over the root as it
# is); docs/raspberry-pi-image.md explains the choices.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
R=$1
ROOTPART=$2
BOOTPART=$3
[ -d "$R/etc" ] && [ -n "$ROOTPART" ] && [ -n "$BOOTPART" ] || {
  echo "usage: customize.sh ROOT ROOTPART BOOTPART" >&2
  exit 2
}
in_root() { chroot "$R" "$@"; }

# --- the image's own files ----------------------------------------------------------------------
# Owned by root whatever the checkout's owner; modes as in the tree (scripts 0755, the rest 0644).
cp -r --no-preserve=ownership,timestamps "$here/rootfs/." "$R/"
chmod 0755 "$R/usr/lib/printloop/firstboot" "$R/usr/lib/printloop/growroot"
sed -i "s|@ROOTPART@|$ROOTPART|" "$R/etc/default/raspi-firmware"

# --- mounts: read-mostly, safe against power loss -----------------------------------------------
# / : noatime (no write per read); fsck at boot (pass 1; cmdline.txt has fsck.repair=yes).
#   The initramfs checks / before mounting it (e2fsck is in it: FSTYPE=ext4, build-image.sh).
# /boot/firmware: nofail (a damaged FAT never stops the boot), only root reads it (the boot file
#   may hold passwords until first boot applies it); fsck pass 2 (fsck.vfat -a).
# /tmp: RAM. No swap. The journal is in RAM too (journald.conf.d/printloop.conf).
cat >"$R/etc/fstab" <<EOF
# <file system>  <mount point>   <type>  <options>                                   <dump> <pass>
$ROOTPART  /               ext4    defaults,noatime,errors=remount-ro                 0 1
$BOOTPART  /boot/firmware  vfat    defaults,noatime,nofail,umask=0077                 0 2
tmpfs      /tmp            tmpfs   nosuid,nodev,mode=1777,size=64M                    0 0
EOF
mkdir -p "$R/boot/firmware"
rm -rf "$R/var/log/journal"

# --- identity -----------------------------------------------------------------------------------
# Until first boot sets one (system.hostname, else printloop-<id>).
echo printloop >"$R/etc/hostname"
cat >"$R/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	printloop
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
# Each Pi makes its own machine id (first boot) and ssh host keys (first ssh start).
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id" "$R"/etc/ssh/ssh_host_*_key "$R"/etc/ssh/ssh_host_*_key.pub
rm -f "$R/var/lib/systemd/random-seed"
# DNS through systemd-resolved's stub.
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"

# --- units --------------------------------------------------------------------------------------
sc() { systemctl --root="$R" --quiet "$@"; }
sc enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service
# Nothing waits for "online": the gateway retries its broker on its own, and a Pi without a
# network must not sit two minutes in the boot.
sc disable systemd-networkd-wait-online.service
sc enable printloop-firstboot.service printloop-growroot.service
sc enable printloop-gateway.service
# ssh: enabled, but its drop-in lets it start only once first boot has installed a key.
sc enable ssh.service
# Wi-Fi: wpa_supplicant for wlan0 starts when wlan0 appears (not with multi-user.target, which
# would wait for a device a Pi without Wi-Fi never has); its drop-in needs the config file.
sc disable wpa_supplicant.service
mkdir -p "$R/etc/systemd/system/sys-subsystem-net-devices-wlan0.device.wants"
ln -sfn /lib/systemd/system/wpa_supplicant@.service \
  "$R/etc/systemd/system/sys-subsystem-net-devices-wlan0.device.wants/wpa_supplicant@wlan0.service"
# No package-list downloads behind the operator's back (SD writes, bandwidth); `apt update` by hand.
sc mask apt-daily.timer apt-daily-upgrade.timer

# --- the service user ---------------------------------------------------------------------------
grep -q '^printloop-gateway:' "$R/etc/passwd" || {
  echo "customize.sh: the .deb did not create the printloop-gateway user" >&2
  exit 1
}
# The printer's serial port is root:dialout.
if ! in_root id -nG printloop-gateway | tr ' ' '\n' | grep -qx dialout; then
  in_root usermod -a -G dialout printloop-gateway
fi

# --- the boot partition -------------------------------------------------------------------------
# raspi-firmware's kernel hook lays out /boot/firmware (kernel, initrd, DTBs, config.txt,
# cmdline.txt) from /etc/default/raspi-firmware; run it again now that ROOTPART is set. It runs
# again by itself on every kernel update on the Pi.
DEB_MAINT_PARAMS=configure in_root /etc/kernel/postinst.d/z50-raspi-firmware
grep -q "root=$ROOTPART " "$R/boot/firmware/cmdline.txt" || {
  echo "customize.sh: cmdline.txt does not name root=$ROOTPART:" >&2
  cat "$R/boot/firmware/cmdline.txt" >&2
  exit 1
}
# The one file the operator edits before the first boot.
install -m 0644 "$here/printloop-gateway.toml" "$R/boot/firmware/printloop-gateway.toml"
