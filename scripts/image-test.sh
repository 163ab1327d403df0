#!/usr/bin/env bash
# Inspects a built Raspberry Pi image without booting it (CI, after scripts/build-image.sh):
#
#   scripts/image-test.sh [target/image/printloop-gateway-<version>-arm64.img]
#
# partition table (sfdisk), boot partition (mtools: firmware, config.txt, cmdline.txt naming the
# right root, kernel, initrd, DTBs, the boot-file template), root file system (debugfs: the
# gateway binary is an aarch64 ELF, units enabled, the service user in dialout, fstab, journald,
# no shipped secrets or host identity). Then, as root with binfmt (as build-image.sh leaves it),
# it mounts the root read-only and runs the image's own gateway binary under qemu-user:
# `--version`, and `firstboot` on the template with an id filled in, into a scratch directory.
# Without an argument it takes the newest image in target/image/. Every mismatch is a FAIL line;
# the exit status is 1 if there was any.
#
# IMAGE_TEST_ALLOW_NO_FIRSTBOOT=1: only warn when the binary has no `firstboot` subcommand.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/dist-lib.sh
. scripts/dist-lib.sh
export MTOOLS_SKIP_CHECK=1
t0=$SECONDS

img=${1:-$(ls -1t "$(dist_target_dir)"/image/printloop-gateway-*-arm64.img 2>/dev/null | head -1 || true)}
[ -n "$img" ] && [ -f "$img" ] || { echo "image-test.sh: no image (run scripts/build-image.sh first)" >&2; exit 1; }
img=$(readlink -f "$img")
if [ "$(id -u)" -eq 0 ]; then apt_install_missing mtools fdisk e2fsprogs file zstd cpio; fi
for t in sfdisk mcopy mdir debugfs file zstd cpio; do
  command -v "$t" >/dev/null || { echo "image-test.sh: $t is missing (mtools, fdisk, e2fsprogs, file, zstd, cpio)" >&2; exit 1; }
done

fails=0
pass() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; fails=$((fails + 1)); }
not() { ! "$@"; }
check() { # check "what" command...
  local what=$1
  shift
  if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi
}

TMP=$(mktemp -d)
MNT=""
cleanup() {
  if [ -n "$MNT" ]; then
    umount "$MNT/tmp" 2>/dev/null || true
    umount "$MNT" 2>/dev/null || true
  fi
  [ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
echo "image: $img ($(( $(stat -c %s "$img") / 1048576 )) MiB)"

# --- partition table ----------------------------------------------------------------------------
echo "--- partition table"
dump=$(sfdisk -d "$img")
echo "$dump" | sed 's/^/      /'
label_id=$(sed -n 's/^label-id: 0x\([0-9a-f]*\)$/\1/p' <<<"$dump")
check "MBR (dos) label" grep -qx 'label: dos' <<<"$dump"
check "disk id is 8 hex digits ($label_id)" grep -Eq '^[0-9a-f]{8}$' <<<"$label_id"
parts=$(grep -c '^/' <<<"$dump" || true)
check "two partitions (found $parts)" test "$parts" = 2
p() { grep "^$img$1 " <<<"$dump" | sed -n "s/.*$2= *\([0-9a-fx]*\).*/\1/p"; } # p <n> <field>
b_start=$(p 1 start); b_size=$(p 1 size); r_start=$(p 2 start); r_size=$(p 2 size)
check "partition 1 starts at 4 MiB ($b_start)" test "$b_start" = 8192
check "partition 1 is FAT32 LBA (type c)" test "$(p 1 type)" = c
check "partition 1 is marked bootable" grep -q "^${img}1 .*bootable" <<<"$dump"
check "partition 2 is Linux (type 83)" test "$(p 2 type)" = 83
check "partition 2 follows partition 1" test "$r_start" = $((b_start + b_size))
check "partition 2 ends at the end of the image (so it can grow)" \
  test $(((r_start + r_size) * 512)) = "$(stat -c %s "$img")"

# --- boot partition -----------------------------------------------------------------------------
echo "--- boot partition"
BOOT="$img@@$((b_start * 512))"
minfo -i "$BOOT" :: >"$TMP/minfo" 2>&1 || true
check "FAT32 file system" grep -q 'FAT32\|fat bits: 32\|big size: .* sectors' "$TMP/minfo"
check "volume label RASPIFIRM" grep -q RASPIFIRM <<<"$(mlabel -s -i "$BOOT" :: 2>/dev/null)"
mdir -b -i "$BOOT" ::/ >"$TMP/bootfiles" 2>/dev/null || true
sed -i 's|^::/||' "$TMP/bootfiles"
echo "      $(wc -l <"$TMP/bootfiles") files: $(tr '\n' ' ' <"$TMP/bootfiles" | cut -c1-300)…"
has_boot() { grep -qx "$1" "$TMP/bootfiles"; }
for f in bootcode.bin start.elf fixup.dat start4.elf fixup4.dat config.txt cmdline.txt \
  printloop-gateway.toml bcm2837-rpi-3-b.dtb bcm2837-rpi-3-b-plus.dtb bcm2711-rpi-4-b.dtb; do
  check "boot: $f" has_boot "$f"
done
mcopy -n -i "$BOOT" ::/config.txt ::/cmdline.txt ::/printloop-gateway.toml "$TMP/" 2>/dev/null || true
kernel=$(sed -n 's/^kernel=//p' "$TMP/config.txt" 2>/dev/null | tail -1)
initrd=$(sed -n 's/^initramfs \([^ ]*\).*/\1/p' "$TMP/config.txt" 2>/dev/null | tail -1)
check "config.txt: arm_64bit=1" grep -qx 'arm_64bit=1' "$TMP/config.txt"
check "config.txt: enable_uart=1" grep -qx 'enable_uart=1' "$TMP/config.txt"
check "config.txt: kernel=$kernel is on the partition" has_boot "$kernel"
check "config.txt: initramfs $initrd is on the partition" has_boot "$initrd"
cmdline=$(cat "$TMP/cmdline.txt" 2>/dev/null || true)
echo "      cmdline.txt: $cmdline"
check "cmdline.txt: root=PARTUUID=$label_id-02" grep -q "root=PARTUUID=$label_id-02 " <<<"$cmdline "
for w in rootwait rw fsck.repair=yes net.ifnames=0; do
  check "cmdline.txt: $w" grep -Eq "(^| )$w( |$)" <<<"$cmdline"
done
check "cmdline.txt: no CMA reservation (it can stop a Pi 4 booting)" not grep -q 'cma=' <<<"$cmdline"
check "cmdline.txt: one line" test "$(wc -l <"$TMP/cmdline.txt")" = 1
check "boot file is the template from packaging/image" cmp -s "$TMP/printloop-gateway.toml" packaging/image/printloop-gateway.toml
check "no error file, no applied file yet" not grep -q 'printloop-gateway.error.txt\|\.applied' "$TMP/bootfiles"
kver=${kernel#vmlinuz-}
# The initramfs: every module of packaging/image/initramfs/modules (what mounts / on a Pi).
mcopy -n -i "$BOOT" "::/$initrd" "$TMP/initrd" 2>/dev/null || true
zstd -dc "$TMP/initrd" 2>/dev/null | cpio -t 2>/dev/null | sed -n 's|.*/\([^/]*\)\.ko$|\1|p' | tr - _ | sort -u >"$TMP/initrd-modules" || true
echo "      initrd: $(( $(stat -c %s "$TMP/initrd" 2>/dev/null || echo 0) / 1024 )) KiB, $(wc -l <"$TMP/initrd-modules") modules"
absent=$(grep -Ev '^[[:space:]]*(#|$)' packaging/image/initramfs/modules | tr - _ | sort -u | comm -23 - "$TMP/initrd-modules" | tr '\n' ' ')
check "initrd holds the modules that mount / ${absent:+(missing: $absent)}" test -z "$absent"
initrd_files=$(zstd -dc "$TMP/initrd" 2>/dev/null | cpio -t 2>/dev/null || true)
check "initrd holds fsck and e2fsck (/ is checked before it is mounted)" \
  test "$(grep -Ec '(^|/)sbin/(fsck|e2fsck)$' <<<"$initrd_files")" = 2

# --- root file system ---------------------------------------------------------------------------
echo "--- root file system"
ROOTFS_IMG=$TMP/root.ext4
dd if="$img" of="$ROOTFS_IMG" bs=4M skip=$((r_start * 512)) count=$((r_size * 512)) \
  iflag=skip_bytes,count_bytes conv=sparse status=none
check "e2fsck -fn: clean" e2fsck -fn "$ROOTFS_IMG"
check "ext4 label RASPIROOT" grep -q '^Filesystem volume name: *RASPIROOT$' <<<"$(dumpe2fs -h "$ROOTFS_IMG" 2>/dev/null)"
free_mb=$(dumpe2fs -h "$ROOTFS_IMG" 2>/dev/null | awk -F: '/^Free blocks/ { f = $2 } /^Block size/ { b = $2 } END { printf "%d", f * b / 1048576 }')
echo "      root: $((r_size / 2048)) MiB, $free_mb MiB free"

dbg() { debugfs -R "$1" "$ROOTFS_IMG" 2>/dev/null; }
rcat() { dbg "cat $1"; }
rexists() { debugfs -R "stat $1" "$ROOTFS_IMG" 2>&1 | grep -q '^Inode:'; }
rtype() { dbg "stat $1" | sed -n 's/.*Type: \([a-z]*\).*/\1/p' | head -1; }
rlink() { dbg "stat $1" | sed -n 's/^Fast link dest: "\(.*\)"$/\1/p'; } # short symlinks
rmode() { dbg "stat $1" | sed -n 's/.*Mode: *0*\([0-7]*\).*/\1/p' | head -1; }
# A symlink's target resolved in the image (absolute or relative to the link's directory).
rresolve() {
  local l t
  l=$(rlink "$1")
  case "$l" in /*) t=$l ;; "") return 1 ;; *) t=$(dirname "$1")/$l ;; esac
  echo "$t"
}

# The gateway binary.
dbg "dump /usr/bin/printloop-gateway $TMP/printloop-gateway" >/dev/null
desc=$(file -b "$TMP/printloop-gateway" 2>/dev/null || true)
echo "      /usr/bin/printloop-gateway: $desc"
check "/usr/bin/printloop-gateway is an aarch64 ELF" grep -q 'ELF 64-bit LSB .*ARM aarch64' <<<"$desc"
check "/usr/bin/printloop-gateway is executable" test "$(rmode /usr/bin/printloop-gateway)" = 755

# Units.
enabled() { # enabled <wants dir> <unit>: a symlink to a unit file that exists in the image
  local link=/etc/systemd/system/$1/$2 target
  [ "$(rtype "$link")" = symlink ] || return 1
  target=$(rresolve "$link") || return 1
  rexists "$target"
}
check "printloop-gateway.service enabled (multi-user.target.wants)" enabled multi-user.target.wants printloop-gateway.service
check "printloop-firstboot.service enabled (sysinit.target.wants)" enabled sysinit.target.wants printloop-firstboot.service
check "printloop-growroot.service enabled (sysinit.target.wants)" enabled sysinit.target.wants printloop-growroot.service
check "systemd-networkd enabled" enabled multi-user.target.wants systemd-networkd.service
check "systemd-resolved enabled" enabled sysinit.target.wants systemd-resolved.service
check "systemd-timesyncd enabled" enabled sysinit.target.wants systemd-timesyncd.service
check "wpa_supplicant@wlan0 wanted by the wlan0 device" enabled sys-subsystem-net-devices-wlan0.device.wants wpa_supplicant@wlan0.service
check "networkd-wait-online not enabled" not rexists /etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service
check "apt-daily timers masked" test "$(rlink /etc/systemd/system/apt-daily.timer)$(rlink /etc/systemd/system/apt-daily-upgrade.timer)" = /dev/null/dev/null

gw_unit=$(rresolve /etc/systemd/system/multi-user.target.wants/printloop-gateway.service || true)
rcat "$gw_unit" >"$TMP/gateway.service"
check "gateway unit runs /usr/bin/printloop-gateway --config /etc/printloop/gateway.toml" \
  grep -q '^ExecStart=.*/usr/bin/printloop-gateway .*--config /etc/printloop/gateway.toml' "$TMP/gateway.service"
check "gateway unit runs as User=printloop-gateway" grep -qx 'User=printloop-gateway' "$TMP/gateway.service"
rcat /etc/systemd/system/printloop-firstboot.service >"$TMP/firstboot.service"
check "firstboot unit: only when the boot file exists" grep -qx 'ConditionPathExists=/boot/firmware/printloop-gateway.toml' "$TMP/firstboot.service"
check "firstboot unit: before the gateway" grep -q '^Before=.*printloop-gateway.service' "$TMP/firstboot.service"
check "firstboot unit: before the network" grep -q '^Before=.*systemd-networkd.service' "$TMP/firstboot.service"
check "firstboot unit: errors on the console" grep -qx 'StandardOutput=journal+console' "$TMP/firstboot.service"
rcat /usr/lib/printloop/firstboot >"$TMP/firstboot"
check "firstboot script runs 'printloop-gateway firstboot --boot-file ... --root /'" \
  grep -q '/usr/bin/printloop-gateway firstboot --boot-file "$file" --root /' "$TMP/firstboot"
check "firstboot and growroot scripts are executable" test "$(rmode /usr/lib/printloop/firstboot) $(rmode /usr/lib/printloop/growroot)" = "755 755"
rcat /etc/systemd/system/ssh.service.d/printloop.conf >"$TMP/ssh.conf"
check "ssh needs the marker first boot writes" grep -qx 'ConditionPathExists=/etc/printloop/ssh-enabled' "$TMP/ssh.conf"
check "ssh off: no marker" not rexists /etc/printloop/ssh-enabled
check "ssh off: no authorized_keys" not rexists /root/.ssh/authorized_keys
check "no ssh host keys shipped" not grep -q 'ssh_host_' <<<"$(dbg 'ls /etc/ssh')"
check "empty machine-id (each Pi makes its own)" test -z "$(rcat /etc/machine-id)"

# The service user.
rcat /etc/passwd >"$TMP/passwd"
rcat /etc/group >"$TMP/group"
check "user printloop-gateway exists" grep -q '^printloop-gateway:' "$TMP/passwd"
gw_gid=$(awk -F: '$1 == "printloop-gateway" { print $4 }' "$TMP/passwd")
in_dialout() {
  awk -F: -v gid="$gw_gid" '$1 == "dialout" && ($3 == gid || ("," $4 ",") ~ /,printloop-gateway,/) { found = 1 }
    END { exit !found }' "$TMP/group"
}
check "printloop-gateway is in dialout" in_dialout

# Mounts and logs.
rcat /etc/fstab >"$TMP/fstab"
sed 's/^/      /' "$TMP/fstab" | grep -v '^      #'
check "fstab: / is PARTUUID=$label_id-02, ext4, noatime, fsck pass 1" \
  grep -Eq "^PARTUUID=$label_id-02[[:space:]]+/[[:space:]]+ext4[[:space:]]+[^[:space:]]*noatime[^[:space:]]*[[:space:]]+0[[:space:]]+1$" "$TMP/fstab"
check "fstab: /boot/firmware is PARTUUID=$label_id-01, vfat, nofail, fsck pass 2" \
  grep -Eq "^PARTUUID=$label_id-01[[:space:]]+/boot/firmware[[:space:]]+vfat[[:space:]]+[^[:space:]]*nofail[^[:space:]]*[[:space:]]+0[[:space:]]+2$" "$TMP/fstab"
check "fstab: /tmp is tmpfs" grep -Eq '^tmpfs[[:space:]]+/tmp[[:space:]]+tmpfs' "$TMP/fstab"
check "fstab: no swap" not grep -Eq '^[^#].*[[:space:]]swap[[:space:]]' "$TMP/fstab"
rcat /etc/systemd/journald.conf.d/printloop.conf >"$TMP/journald.conf"
check "journald: Storage=volatile" grep -qx 'Storage=volatile' "$TMP/journald.conf"
check "no persistent journal directory" not rexists /var/log/journal
check "resolv.conf is resolved's stub" test "$(rlink /etc/resolv.conf)" = ../run/systemd/resolve/stub-resolv.conf

# Kernel, firmware and what first boot needs.
check "kernel modules for $kver" rexists "/usr/lib/modules/$kver/modules.dep"
check "Wi-Fi firmware (Pi 3B+/4: brcmfmac43455)" rexists /usr/lib/firmware/brcm/brcmfmac43455-sdio.bin
check "Wi-Fi firmware (Pi 3B/Zero 2 W: brcmfmac43430)" rexists /usr/lib/firmware/brcm/brcmfmac43430-sdio.bin
check "wireless regulatory database" rexists /usr/lib/firmware/regulatory.db
check "time zones (first boot links /etc/localtime)" rexists /usr/share/zoneinfo/Europe/Berlin
check "raspi-firmware settings name the root" grep -qx "ROOTPART=PARTUUID=$label_id-02" <<<"$(rcat /etc/default/raspi-firmware)"
check "hostname until first boot: printloop" test "$(rcat /etc/hostname)" = printloop

# --- the image's own binary, under qemu-user ----------------------------------------------------
echo "--- the image's gateway binary (qemu-user)"
if [ "$(id -u)" -ne 0 ] || ! grep -qs enabled /proc/sys/fs/binfmt_misc/qemu-aarch64; then
  fail "cannot run the image's binary: needs root and qemu-aarch64 in binfmt_misc (scripts/build-image.sh sets both up)"
else
  MNT=$TMP/mnt
  mkdir -p "$MNT"
  LOOP=$(losetup -r -f --show -o $((r_start * 512)) --sizelimit $((r_size * 512)) "$img")
  mount -o ro,noload "$LOOP" "$MNT"
  mount -t tmpfs -o size=16m tmpfs "$MNT/tmp"
  ver=$(chroot "$MNT" /usr/bin/printloop-gateway --version 2>&1 || true)
  echo "      printloop-gateway --version: $ver"
  check "the binary runs on the image's libc" grep -q '^printloop-gateway ' <<<"$ver"
  if chroot "$MNT" /usr/bin/printloop-gateway --help 2>&1 | grep -qw firstboot; then
    # The template with an id, applied into a scratch root inside the image's /tmp.
    mkdir -p "$MNT/tmp/boot" "$MNT/tmp/root/etc" "$MNT/tmp/root/usr/share/zoneinfo"
    sed 's/^id = ""/id = "ci-1"/' packaging/image/printloop-gateway.toml >"$MNT/tmp/boot/printloop-gateway.toml"
    printf '\n' >>"$MNT/tmp/boot/printloop-gateway.toml"
    cp "$TMP/passwd" "$MNT/tmp/root/etc/passwd"
    out=$(chroot "$MNT" /usr/bin/printloop-gateway firstboot --boot-file /tmp/boot/printloop-gateway.toml --root /tmp/root 2>&1) && rc=0 || rc=$?
    echo "$out" | sed 's/^/      /'
    check "firstboot applies the template (with an id)" test "$rc" = 0
    check "firstboot wrote /etc/printloop/gateway.toml" grep -q '^id = "ci-1"' "$MNT/tmp/root/etc/printloop/gateway.toml"
    check "firstboot renamed the boot file to .applied" test -f "$MNT/tmp/boot/printloop-gateway.toml.applied" -a ! -e "$MNT/tmp/boot/printloop-gateway.toml"
    printf 'id = "Bad Id"\n' >"$MNT/tmp/boot/printloop-gateway.toml"
    chroot "$MNT" /usr/bin/printloop-gateway firstboot --boot-file /tmp/boot/printloop-gateway.toml --root /tmp/root >/dev/null 2>&1 && rc=0 || rc=$?
    check "firstboot refuses a bad file (exit $rc)" test "$rc" != 0
    check "firstboot explains it in printloop-gateway.error.txt" grep -q '`id`' "$MNT/tmp/boot/printloop-gateway.error.txt"
  elif [ "${IMAGE_TEST_ALLOW_NO_FIRSTBOOT:-0}" = 1 ]; then
    echo "WARN  the binary has no 'firstboot' subcommand: the image cannot apply its boot file (allowed by IMAGE_TEST_ALLOW_NO_FIRSTBOOT=1)"
  else
    fail "the binary has no 'firstboot' subcommand: printloop-firstboot.service would fail on every Pi"
  fi
fi

echo
if [ "$fails" -eq 0 ]; then
  echo "image-test.sh: all checks passed ($((SECONDS - t0)) s)"
else
  echo "image-test.sh: $fails check(s) FAILED ($((SECONDS - t0)) s)" >&2
  exit 1
fi
