# shellcheck shell=bash
# Shared by scripts/cross.sh, scripts/package.sh and scripts/package-test.sh (sourced, not run):
# which binary is built for which target, where it lands, and the ELF checks every script applies.
# Each rule is written once here.

# The cargo target directory: honours CARGO_TARGET_DIR like cargo itself.
dist_target_dir() {
  local d="${CARGO_TARGET_DIR:-target}"
  case "$d" in /*) ;; *) d="$PWD/$d" ;; esac
  echo "$d"
}

# The targets we ship, in build order, and the binaries built for each.
# armv7 (32-bit Raspberry Pi OS: Pi 2, Pi Zero 2 W on a 32-bit image) gets only the gateway: the
# supervisor runs on a server, and building `printloop` for armhf would add a whole extra build
# to every CI run for a package nobody asked for (see the timings in scripts/cross.sh).
# shellcheck disable=SC2034 # used by the scripts that source this file
DIST_TRIPLES=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
dist_bins() {
  case "$1" in
    x86_64-unknown-linux-gnu | aarch64-unknown-linux-gnu) echo "printloop-gateway printloop" ;;
    armv7-unknown-linux-gnueabihf) echo "printloop-gateway" ;;
    *) echo "dist_bins: unknown target $1" >&2; return 1 ;;
  esac
}

# Where cargo puts a binary built with `--profile dist --target <triple>`.
dist_bin_path() { echo "$(dist_target_dir)/$1/dist/$2"; }

# A crate's version as Debian spells it ("-" would start a Debian revision: a pre-release uses "~").
crate_version() {
  local v
  v=$(cargo metadata --no-deps --format-version 1 --offline |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == sys.argv[1]))' "$1")
  echo "${v//-/\~}"
}

# Debian's architecture name for a Rust target triple.
deb_arch() {
  case "$1" in
    x86_64-unknown-linux-gnu) echo amd64 ;;
    aarch64-unknown-linux-gnu) echo arm64 ;;
    armv7-unknown-linux-gnueabihf) echo armhf ;;
    *) echo "deb_arch: unknown target $1" >&2; return 1 ;;
  esac
}

# How this (amd64) machine runs a binary of the target: directly, or under qemu-user with the
# target's libc from Debian's cross packages (qemu-user-static, libc6-<arch>-cross).
dist_runner() {
  case "$1" in
    x86_64-unknown-linux-gnu) echo "" ;;
    aarch64-unknown-linux-gnu) echo "qemu-aarch64-static -L /usr/aarch64-linux-gnu" ;;
    armv7-unknown-linux-gnueabihf) echo "qemu-arm-static -L /usr/arm-linux-gnueabihf" ;;
    *) echo "dist_runner: unknown target $1" >&2; return 1 ;;
  esac
}

# The pattern `file` must print for a binary of this target (and it must say "stripped").
file_pattern() {
  case "$1" in
    x86_64-unknown-linux-gnu) echo 'ELF 64-bit LSB .*x86-64' ;;
    aarch64-unknown-linux-gnu) echo 'ELF 64-bit LSB .*ARM aarch64' ;;
    armv7-unknown-linux-gnueabihf) echo 'ELF 32-bit LSB .*ARM, EABI5' ;;
    *) echo "file_pattern: unknown target $1" >&2; return 1 ;;
  esac
}

# Fails (non-zero, with a message) unless $2 is a stripped ELF executable for target $1.
check_elf_arch() {
  local triple="$1" bin="$2" desc
  desc=$(file -b "$bin")
  if ! grep -Eq "$(file_pattern "$triple")" <<<"$desc"; then
    echo "FAIL: $bin is not a $triple binary: $desc" >&2
    return 1
  fi
  if grep -q 'not stripped' <<<"$desc"; then
    echo "FAIL: $bin is not stripped: $desc" >&2
    return 1
  fi
}

# The highest GLIBC_x.y symbol version the binary needs (its glibc floor), e.g. "2.34".
# readelf reads any architecture's ELF (the host's objdump may not know arm64/armhf).
glibc_floor() {
  LC_ALL=C readelf --version-info -W "$1" |
    sed -n 's/.*Name: GLIBC_\([0-9][0-9.]*\).*/\1/p' | sort -uV | tail -1
}

# The shared libraries the binary links (DT_NEEDED), one per line.
elf_needed() {
  LC_ALL=C readelf -d -W "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'
}

# The highest GCC_x.y symbol version the binary needs from libgcc_s (empty if none).
libgcc_floor() {
  LC_ALL=C readelf --version-info -W "$1" |
    sed -n 's/.*Name: GCC_\([0-9][0-9.]*\).*/\1/p' | sort -uV | tail -1
}

# apt-get install the given packages if any is missing (as root, or through sudo).
apt_install_missing() {
  local missing=() p sudo_=""
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  echo "installing ${missing[*]}"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
