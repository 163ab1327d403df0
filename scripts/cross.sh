#!/usr/bin/env bash
# Builds the shipped binaries with the `dist` profile (release, fat LTO, no debug info, stripped):
#
#   x86_64-unknown-linux-gnu       printloop-gateway printloop  (servers, amd64 .debs)
#   aarch64-unknown-linux-gnu      printloop-gateway printloop  (64-bit Raspberry Pi OS, servers)
#   armv7-unknown-linux-gnueabihf  printloop-gateway            (32-bit Raspberry Pi OS)
#
# into $CARGO_TARGET_DIR/<triple>/dist/<bin> (default target/), then prints each binary's size and
# glibc floor and fails if one is not an ELF for its target or is not stripped.
#
#   scripts/cross.sh                                # every target
#   scripts/cross.sh aarch64-unknown-linux-gnu      # only these
#   PRINTLOOP_DIST_HOST=release scripts/cross.sh    # the host's: strip $TARGET/release/* (CI)
#
# Installs what it needs when it is missing: the rustup targets, and Debian's cross compilers and
# libc (gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross).
# The cross gcc links the binary and compiles ring's C and assembly (the only C in the graph since
# aws-lc-sys left it; TLS is rustls + ring). The binaries link against bookworm's glibc 2.36, which
# makes them need glibc >= 2.34 (`__libc_start_main@GLIBC_2.34`; printloop 2.35 for `hypot`):
# Debian 12 / Raspberry Pi OS 12 and later.
#
# Measured cold on the 2-core machine (empty target dir, crates already downloaded), in this order:
#   aarch64  both binaries   5m48s  (includes the host's build scripts and proc macros, built once
#                                    and shared by the other targets)
#   armv7    gateway         1m42s  (printloop too would add about 3 min: not built, nobody runs
#                                    the supervisor on a 32-bit Pi)
#   x86_64   both binaries   6m26s  (CI skips it: PRINTLOOP_DIST_HOST=release)
# A warm run (nothing changed) takes about a second per target.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
# shellcheck source=scripts/dist-lib.sh
. scripts/dist-lib.sh

triples=("$@")
[ ${#triples[@]} -gt 0 ] || triples=("${DIST_TRIPLES[@]}")
host=$(rustc -vV | sed -n 's/^host: //p')

# --- what the build needs ---------------------------------------------------------------------
apt_pkgs=(file binutils)
for t in "${triples[@]}"; do
  dist_bins "$t" >/dev/null # fails on an unknown target
  case "$t" in
    aarch64-unknown-linux-gnu) apt_pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
    armv7-unknown-linux-gnueabihf) apt_pkgs+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
  esac
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done
apt_install_missing "${apt_pkgs[@]}"

# The linker and the C compiler (for ring, through the cc crate) of each cross target; a value
# already in the environment wins.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER="${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-aarch64-linux-gnu-gcc}"
export CC_aarch64_unknown_linux_gnu="${CC_aarch64_unknown_linux_gnu:-aarch64-linux-gnu-gcc}"
export AR_aarch64_unknown_linux_gnu="${AR_aarch64_unknown_linux_gnu:-aarch64-linux-gnu-ar}"
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER="${CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER:-arm-linux-gnueabihf-gcc}"
export CC_armv7_unknown_linux_gnueabihf="${CC_armv7_unknown_linux_gnueabihf:-arm-linux-gnueabihf-gcc}"
export AR_armv7_unknown_linux_gnueabihf="${AR_armv7_unknown_linux_gnueabihf:-arm-linux-gnueabihf-ar}"

# --- build ------------------------------------------------------------------------------------
declare -A took
for t in "${triples[@]}"; do
  if [ "$t" = "$host" ] && [ "${PRINTLOOP_DIST_HOST:-}" = release ]; then
    # CI has just built the release binaries for the host (`cargo build --release --workspace`):
    # strip those instead of compiling everything a second time (6 min cold). They are the same
    # code without LTO (printloop 18 MB instead of 13) and with the whole workspace's dependency
    # features: the very binaries CI's demo and chaos steps run.
    echo "=== $t: the release build's binaries, stripped (PRINTLOOP_DIST_HOST=release)"
    for b in $(dist_bins "$t"); do
      src="$(dist_target_dir)/release/$b"
      [ -x "$src" ] || { echo "FAIL: $src is missing: cargo build --release first" >&2; exit 1; }
      mkdir -p "$(dirname "$(dist_bin_path "$t" "$b")")"
      strip --strip-all -o "$(dist_bin_path "$t" "$b")" "$src"
    done
    took[$t]=0
    continue
  fi
  args=()
  for b in $(dist_bins "$t"); do
    case "$b" in
      printloop) args+=(-p printloop --bin printloop) ;;
      printloop-gateway) args+=(-p gateway --bin printloop-gateway) ;;
    esac
  done
  linker_var="CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$t")_LINKER"
  [ "$t" = "$host" ] || echo "cross-compiling for $t (linker: ${!linker_var:-?})"
  echo "=== cargo build --locked --profile dist --target $t ${args[*]}"
  start=$SECONDS
  # --locked: never rewrite Cargo.lock; a stale lock file is an error, not a silent update.
  cargo build --locked --profile dist --target "$t" "${args[@]}"
  took[$t]=$((SECONDS - start))
done

# --- check and report -------------------------------------------------------------------------
echo
printf '%-31s %-18s %9s %7s %6s  %s\n' target binary bytes MiB glibc "build (s)"
fail=0
for t in "${triples[@]}"; do
  for b in $(dist_bins "$t"); do
    p=$(dist_bin_path "$t" "$b")
    if [ ! -x "$p" ]; then echo "FAIL: $p was not built" >&2; fail=1; continue; fi
    check_elf_arch "$t" "$p" || fail=1
    size=$(stat -c %s "$p")
    printf '%-31s %-18s %9d %7.1f %6s  %s\n' "$t" "$b" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" \
      "$(glibc_floor "$p")" "${took[$t]}"
  done
done
[ $fail -eq 0 ] || { echo "cross.sh: some binaries are wrong (see FAIL above)" >&2; exit 1; }
echo "binaries: $(dist_target_dir)/<target>/dist/<binary>"
