#!/usr/bin/env bash
# Builds the flashable Raspberry Pi image of the printloop gateway (issue #9):
#
#   scripts/build-image.sh [path/to/printloop-gateway_<version>_arm64.deb]
#
#   -> target/image/printloop-gateway-<version>-arm64.img         raw image: dd / Raspberry Pi Imager
#      target/image/printloop-gateway-<version>-arm64.img.xz      the same, compressed (IMAGE_XZ=0: skip)
#      target/image/printloop-gateway-<version>-arm64.img.bmap    for bmaptool copy (when bmaptool is there)
#      target/image/printloop-gateway-<version>-arm64.img.sha256  checksums of the files above
#
# Without an argument it takes the newest target/debian/printloop-gateway_*_arm64.deb, and builds
# it with scripts/package.sh when there is none.
#
# The system: Debian bookworm arm64 (minbase + systemd), the Debian kernel (linux-image-arm64),
# Raspberry Pi boot firmware (raspi-firmware), Wi-Fi firmware (firmware-brcm80211),
# systemd-networkd + wpa_supplicant, systemd-resolved (mDNS), systemd-timesyncd, openssh-server
# (off until the boot file gives a key), and the printloop-gateway .deb with its unit enabled.
# What the image adds on top lives in packaging/image/ (units, scripts, the boot-file template)
# and is applied by packaging/image/customize.sh. Layout: MBR; partition 1 FAT32 "RASPIFIRM"
# (/boot/firmware: firmware, config.txt, cmdline.txt, kernel, initrd, DTBs, the boot file);
# partition 2 ext4 "RASPIROOT" (/), grown to fill the card on the first boot.
# See docs/raspberry-pi-image.md.
#
# How: mmdebstrap builds the arm64 root under qemu-user (binfmt) in two stages. Stage 1 (the base:
# every Debian package, the kernel and its initramfs; the slow part) is cached as a tarball in
# target/image/cache/, keyed by its inputs and rebuilt when older than IMAGE_BASE_MAX_AGE_DAYS
# (security updates). Stage 2 (every build) unpacks it, installs the .deb and customizes. Then
# mkfs.vfat + mcopy and mkfs.ext4 -d build the two file systems as files and sfdisk + dd put them
# in the image: no loop devices, no mounts of the image.
#
# Needs root (mmdebstrap's root mode, chroot). Installs what it needs when it is missing:
# mmdebstrap qemu-user-static mtools dosfstools fdisk e2fsprogs xz-utils bmap-tools (apt), and
# registers qemu-aarch64 with binfmt_misc (mounting /proc/sys/fs/binfmt_misc when needed).
#
# Environment:
#   IMAGE_XZ=0                     do not write the .img.xz
#   IMAGE_CACHE_DIR=DIR            where the base tarball is kept (default target/image/cache; CI
#                                  can point it outside the checkout to stay warm between runs)
#   IMAGE_REBUILD_BASE=1           rebuild the cached base even if it is fresh
#   IMAGE_BASE_MAX_AGE_DAYS=14     rebuild the base when it is older than this
#   IMAGE_MIRROR=http://deb.debian.org/debian
#   IMAGE_SECURITY_MIRROR=http://deb.debian.org/debian-security
#   IMAGE_BOOT_MB=256              size of the FAT partition
#   IMAGE_ROOT_FREE_MB=256         free space left in the root file system before it is grown
#   IMAGE_DISK_ID=0x1234abcd       MBR disk identifier (PARTUUID prefix); default: derived from
#                                  the version and the .deb, so a rebuild of the same .deb is the same
#
# Measured times and sizes: docs/raspberry-pi-image.md ("Build it").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
# shellcheck source=scripts/dist-lib.sh
. scripts/dist-lib.sh

OUT=$(dist_target_dir)/image
CACHE=${IMAGE_CACHE_DIR:-$OUT/cache}
WORK=$OUT/work
SUITE=bookworm
MIRROR=${IMAGE_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${IMAGE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BOOT_MB=${IMAGE_BOOT_MB:-256}
ROOT_FREE_MB=${IMAGE_ROOT_FREE_MB:-256}
MAX_AGE_DAYS=${IMAGE_BASE_MAX_AGE_DAYS:-14}

# Stage 1's packages (on top of minbase). Anything the .deb depends on that is missing here is
# fetched in stage 2 (slower, and the image test would still pass): keep its dependencies here.
BASE_PACKAGES=(
  systemd systemd-sysv udev dbus systemd-timesyncd systemd-resolved
  linux-image-arm64 raspi-firmware firmware-brcm80211 wireless-regdb
  wpasupplicant openssh-server
  ca-certificates tzdata adduser netbase
  fdisk e2fsprogs dosfstools zstd kmod iproute2 iputils-ping procps less nano
)
# No documentation, manual pages or translations in the image (the copyright files stay); also
# in force for packages installed later on the Pi (dpkg.cfg.d).
DPKG_OPTS=(
  force-confold force-confdef
  'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*'
  'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright'
  'path-exclude=/usr/share/locale/*' 'path-include=/usr/share/locale/locale.alias'
  'path-exclude=/usr/share/lintian/*'
)
# initramfs: zstd, and only the modules needed to mount / (packaging/image/initramfs/modules):
# MODULES=most would take tens of minutes under qemu-user. IMAGE_INITRAMFS_MODULES=most for that.
# FSTYPE=ext4: initramfs-tools' fsck hook then puts fsck and e2fsck in the initramfs, which checks
# / (and repairs it: fsck.repair=yes) before mounting it. Left to probe the root device (auto), the
# hook finds none in a build chroot and leaves fsck out.
INITRD_MODULES=${IMAGE_INITRAMFS_MODULES:-list}
ESSENTIAL_HOOK="mkdir -p \"\$1/etc/initramfs-tools/conf.d\" \"\$1/usr/share/initramfs-tools/modules.d\" \
 && printf 'COMPRESS=zstd\\nMODULES=$INITRD_MODULES\\nFSTYPE=ext4\\n' >\"\$1/etc/initramfs-tools/conf.d/printloop.conf\" \
 && cp '$REPO/packaging/image/initramfs/modules' \"\$1/usr/share/initramfs-tools/modules.d/printloop-image\""
SOURCES=(
  "deb $MIRROR $SUITE main non-free-firmware"
  "deb $MIRROR $SUITE-updates main non-free-firmware"
  "deb $SECURITY_MIRROR $SUITE-security main non-free-firmware"
)

say() { printf '\n=== %s\n' "$*"; }
die() { printf 'build-image.sh: %s\n' "$*" >&2; exit 1; }
t0=$SECONDS
declare -A took

[ "$(id -u)" -eq 0 ] || die "run as root: mmdebstrap builds the root file system in root mode (chroot, device nodes, owners)"

# --- host tools ---------------------------------------------------------------------------------
# arch-test: mmdebstrap refuses a foreign architecture without it (it is only a Recommends, and
# package-test.sh may have installed mmdebstrap without recommends first).
apt_install_missing mmdebstrap arch-test qemu-user-static binfmt-support mtools dosfstools fdisk e2fsprogs xz-utils bmap-tools file
export MTOOLS_SKIP_CHECK=1

# qemu-aarch64 must be registered with binfmt_misc so mmdebstrap can run arm64 maintainer scripts.
# PID 1 is not systemd everywhere (containers, CI): register it by hand when needed.
ensure_binfmt() {
  local dir=/proc/sys/fs/binfmt_misc conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  [ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir" ||
    die "cannot mount binfmt_misc on $dir (a container without the privilege?)"
  if [ ! -e "$dir/qemu-aarch64" ]; then
    if [ -r "$conf" ]; then
      grep -v '^#' "$conf" | head -1 >"$dir/register"
    else
      update-binfmts --enable qemu-aarch64
    fi
  fi
  grep -qx enabled "$dir/qemu-aarch64" || die "qemu-aarch64 is registered with binfmt_misc but disabled"
  grep -q 'flags: .*F' "$dir/qemu-aarch64" ||
    die "qemu-aarch64's binfmt entry lacks the F flag (fix-binary), which chroots need: see $conf"
}
ensure_binfmt

# --- the .deb -----------------------------------------------------------------------------------
deb=${1:-}
if [ -z "$deb" ]; then
  deb=$(ls -1t "$(dist_target_dir)"/debian/printloop-gateway_*_arm64.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    [ -x scripts/package.sh ] ||
      die "no target/debian/printloop-gateway_*_arm64.deb and no scripts/package.sh to build it; pass the .deb's path"
    say "no arm64 .deb yet: building it with PRINTLOOP_DEB_ARCHES=arm64 scripts/package.sh"
    PRINTLOOP_DEB_ARCHES=arm64 scripts/package.sh
    deb=$(ls -1t "$(dist_target_dir)"/debian/printloop-gateway_*_arm64.deb 2>/dev/null | head -1 || true)
    [ -n "$deb" ] || die "scripts/package.sh made no target/debian/printloop-gateway_*_arm64.deb"
  fi
fi
[ -f "$deb" ] || die "$deb: no such file"
deb=$(readlink -f "$deb")
[ "$(dpkg-deb -f "$deb" Package)" = printloop-gateway ] || die "$deb is not the printloop-gateway package"
[ "$(dpkg-deb -f "$deb" Architecture)" = arm64 ] || die "$deb is not built for arm64"
VERSION=$(dpkg-deb -f "$deb" Version)
NAME=printloop-gateway-${VERSION}-arm64
IMG=$OUT/$NAME.img
echo "package: $deb (version $VERSION)"

# Disk identifier: the PARTUUIDs (<id>-01, <id>-02) in cmdline.txt and fstab.
if [ -n "${IMAGE_DISK_ID:-}" ]; then
  DISK_ID=${IMAGE_DISK_ID#0x}
else
  DISK_ID=$(sha256sum "$deb" | cut -c1-8)
fi
[[ "$DISK_ID" =~ ^[0-9a-f]{8}$ ]] || die "IMAGE_DISK_ID must be 8 hex digits"
h=$(printf '%s' "$DISK_ID-$VERSION-root" | sha256sum | cut -c1-32)
ROOT_UUID="${h:0:8}-${h:8:4}-4${h:13:3}-a${h:17:3}-${h:20:12}"
BOOT_VOLID=${DISK_ID}

mkdir -p "$OUT" "$CACHE"
rm -rf "$WORK"
mkdir -p "$WORK"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# --- stage 1: the base (cached) -----------------------------------------------------------------
key=$( {
  echo "base v1 $SUITE arm64 minbase"
  printf '%s\n' "${BASE_PACKAGES[@]}" "${DPKG_OPTS[@]}" "${SOURCES[@]}" "${ESSENTIAL_HOOK//$REPO/REPO}"
  cat packaging/image/initramfs/modules
} | sha256sum | cut -c1-16)
BASE=$CACHE/base-$key.tar
if [ -f "$BASE" ] && [ "${IMAGE_REBUILD_BASE:-0}" != 1 ] &&
  [ -z "$(find "$BASE" -mtime +"$MAX_AGE_DAYS" 2>/dev/null)" ]; then
  say "stage 1: cached base $BASE ($(du -h "$BASE" | cut -f1), $(( ($(date +%s) - $(stat -c %Y "$BASE")) / 3600 )) h old)"
  took[base]=0
else
  say "stage 1: building the base with mmdebstrap (arm64 under qemu-user; a few minutes)"
  s=$SECONDS
  rm -f "$CACHE"/base-*.tar "$CACHE"/base-*.tar.tmp
  dpkgopts=()
  for o in "${DPKG_OPTS[@]}"; do dpkgopts+=("--dpkgopt=$o"); done
  # Package lists stay in the tarball so stage 2 can resolve the .deb's dependencies.
  mmdebstrap --mode=root --variant=minbase --architectures=arm64 \
    --format=tar \
    "${dpkgopts[@]}" \
    --skip=cleanup/apt/lists \
    --essential-hook="$ESSENTIAL_HOOK" \
    --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" \
    "$SUITE" "$BASE.tmp" "${SOURCES[@]}"
  mv "$BASE.tmp" "$BASE"
  took[base]=$((SECONDS - s))
fi

# --- stage 2: the .deb and the image's own files ------------------------------------------------
say "stage 2: unpack the base, install $(basename "$deb"), customize"
s=$SECONDS
ROOTFS=$WORK/rootfs
ROOTPART="PARTUUID=$DISK_ID-02"
BOOTPART="PARTUUID=$DISK_ID-01"
cp "$deb" "$WORK/gateway.deb"
# The .deb is installed with apt from a path so that any dependency missing from the base is
# fetched (with the package lists kept in the base); the lists are removed afterwards.
mmdebstrap --mode=root --variant=custom --architectures=arm64 \
  --skip=update \
  --setup-hook="mkdir -p \"\$1\" && tar -C \"\$1\" --xattrs --xattrs-include='*' --numeric-owner -xpf '$BASE'" \
  --customize-hook="cp '$WORK/gateway.deb' \"\$1/tmp/printloop-gateway_arm64.deb\"" \
  --customize-hook='chroot "$1" sh -c "apt-get install -y --no-install-recommends /tmp/printloop-gateway_arm64.deb || { apt-get update && apt-get install -y --no-install-recommends /tmp/printloop-gateway_arm64.deb; }"' \
  --customize-hook='rm -f "$1/tmp/printloop-gateway_arm64.deb"' \
  --customize-hook="bash '$REPO/packaging/image/customize.sh' \"\$1\" '$ROOTPART' '$BOOTPART'" \
  "$SUITE" "$ROOTFS" "${SOURCES[@]}"
took[stage2]=$((SECONDS - s))

# --- the file systems ---------------------------------------------------------------------------
say "file systems"
s=$SECONDS
BOOTFS=$WORK/bootfs
mkdir -p "$BOOTFS"
# The boot partition's content, laid out by raspi-firmware, leaves the root (its mount point stays).
cp -a "$ROOTFS/boot/firmware/." "$BOOTFS/"
find "$ROOTFS/boot/firmware" -mindepth 1 -delete
for f in config.txt cmdline.txt printloop-gateway.toml bootcode.bin start4.elf fixup4.dat; do
  [ -f "$BOOTFS/$f" ] || die "the boot partition lacks $f"
done
ls "$BOOTFS"/vmlinuz-* "$BOOTFS"/initrd.img-* "$BOOTFS"/bcm2711-rpi-4-b.dtb >/dev/null ||
  die "the boot partition lacks the kernel, the initrd or the DTBs"
boot_used=$(du -sm "$BOOTFS" | cut -f1)
[ "$boot_used" -lt $((BOOT_MB * 6 / 10)) ] ||
  die "the boot files take ${boot_used} MiB of the ${BOOT_MB} MiB partition: a kernel update needs room for a second copy"

BOOT_IMG=$WORK/boot.vfat
mkfs.vfat -F 32 -n RASPIFIRM -i "$BOOT_VOLID" -C "$BOOT_IMG" $((BOOT_MB * 1024)) >/dev/null
mcopy -s -p -m -i "$BOOT_IMG" "$BOOTFS"/* ::/

# ext4: the content, 15 % for metadata and small files, the journal, and some free space; the
# first boot grows it to the card.
root_used=$(du -s --block-size=1M "$ROOTFS" | cut -f1)
ROOT_MB=$(( (root_used * 115 / 100 + 64 + ROOT_FREE_MB + 3) / 4 * 4 ))
ROOT_IMG=$WORK/root.ext4
mkfs.ext4 -q -F -L RASPIROOT -U "$ROOT_UUID" -d "$ROOTFS" -E root_owner=0:0 \
  "$ROOT_IMG" "${ROOT_MB}M"
e2fsck -f -n "$ROOT_IMG" >/dev/null || die "the new root file system does not pass e2fsck"
took[filesystems]=$((SECONDS - s))

# --- the image ----------------------------------------------------------------------------------
say "image"
s=$SECONDS
START=8192 # 4 MiB: the first partition aligned for SD cards' erase blocks
BOOT_SECTORS=$((BOOT_MB * 2048))
ROOT_START=$((START + BOOT_SECTORS))
ROOT_SECTORS=$((ROOT_MB * 2048))
rm -f "$IMG" "$IMG".*
truncate -s $(((ROOT_START + ROOT_SECTORS) * 512)) "$IMG"
sfdisk --quiet "$IMG" <<EOF
label: dos
label-id: 0x$DISK_ID
unit: sectors

start=$START, size=$BOOT_SECTORS, type=c, bootable
start=$ROOT_START, size=$ROOT_SECTORS, type=83
EOF
dd if="$BOOT_IMG" of="$IMG" bs=4M seek=$((START * 512)) oflag=seek_bytes conv=notrunc,sparse status=none
dd if="$ROOT_IMG" of="$IMG" bs=4M seek=$((ROOT_START * 512)) oflag=seek_bytes conv=notrunc,sparse status=none
rm -f "$BOOT_IMG" "$ROOT_IMG"
files=("$IMG")
if command -v bmaptool >/dev/null; then
  bmaptool create -o "$IMG.bmap" "$IMG"
  files+=("$IMG.bmap")
fi
took[image]=$((SECONDS - s))
if [ "${IMAGE_XZ:-1}" != 0 ]; then
  say "xz"
  s=$SECONDS
  xz -T0 -6 -k -f "$IMG"
  files+=("$IMG.xz")
  took[xz]=$((SECONDS - s))
fi
(cd "$OUT" && sha256sum "${files[@]##*/}" >"$NAME.img.sha256")
s=$SECONDS
rm -rf "$WORK"
took[cleanup]=$((SECONDS - s))

# --- report -------------------------------------------------------------------------------------
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
echo
echo "image:      $IMG"
echo "            $(mib "$(stat -c %s "$IMG")") MiB (allocated $(du -m "$IMG" | cut -f1) MiB): boot ${BOOT_MB} MiB FAT32, root ${ROOT_MB} MiB ext4 (${root_used} MiB used)"
[ -f "$IMG.xz" ] && echo "compressed: $IMG.xz $(mib "$(stat -c %s "$IMG.xz")") MiB"
echo "disk id:    0x$DISK_ID (root=$ROOTPART)"
echo "checksums:  $OUT/$NAME.img.sha256"
printf 'time (s):   base %s, stage 2 %s, file systems %s, image %s, xz %s, cleanup %s, total %s\n' \
  "${took[base]}" "${took[stage2]}" "${took[filesystems]}" "${took[image]}" "${took[xz]:-0}" \
  "${took[cleanup]}" $((SECONDS - t0))
