#!/usr/bin/env bash
# Builds the Debian packages with plain `dpkg-deb --build` (no cargo-deb, no debhelper: every file
# and field is written here or in packaging/, nothing is generated behind your back):
#
#   $TARGET/debian/printloop-gateway_<ver>_{amd64,arm64,armhf}.deb   the gateway (on each Pi)
#   $TARGET/debian/printloop_<ver>_{amd64,arm64}.deb                 supervisor + broker + CLI
#
# ($TARGET is $CARGO_TARGET_DIR, default target/.) Then checks them: lintian on each .deb, and
# `systemd-analyze verify` + `security --offline` on both units (the exposure figure is printed).
#
#   scripts/package.sh              # runs scripts/cross.sh first (a no-op when the build is fresh)
#   scripts/package.sh --no-build   # packages the binaries already in $TARGET/<triple>/dist/
#
# The version is each crate's (Cargo.toml); PRINTLOOP_DEB_VERSION overrides it for every package
# (scripts/package-test.sh builds an upgrade with it). Also from the environment:
#   PRINTLOOP_DEB_ARCHES="amd64 arm64 armhf"   only these architectures
#   PRINTLOOP_DEB_OUT=DIR                      write the .debs there instead of $TARGET/debian
#   PRINTLOOP_DEB_MAINTAINER="Name <mail>"     the Maintainer field
#   PRINTLOOP_DEB_LINTIAN=0                    skip lintian (package-test.sh's upgrade build)
#
# Each package ships: the binary in /usr/bin, its unit in /lib/systemd/system, its config in
# /etc/printloop/ (a conffile: an upgrade never overwrites the operator's edits), the docs, the
# copyright (Apache-2.0), and the maintainer scripts in packaging/debian/<package>/.
# Depends is computed from the binary: libc6 (>= its glibc floor), libgcc-s1 (>= its libgcc
# floor, when it links libgcc_s), and adduser (postinst creates the system user).
#
# lintian: run on every .deb; the run fails on any error or warning except this one, left on
# purpose:
#   non-standard-file-perm   the configs are shipped 0640: they may hold the MQTT password, so they
#                            are never world-readable, not even between unpack and postinst (which
#                            gives them to the service's group).
# and these info-level tags (not shown by default, and they do not fail the run):
#   binary-has-unneeded-section .comment   rustc's `strip = true` keeps .comment (~100 bytes).
#   hardening-no-fortify-functions         Rust does not use glibc's _FORTIFY_SOURCE wrappers.
#   package-supports-alternative-init-but-no-init.d-script
#                                          systemd only, as design.md §10 says.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
# shellcheck source=scripts/dist-lib.sh
. scripts/dist-lib.sh

build=1
case "${1:-}" in
  --no-build) build=0 ;;
  "") ;;
  *) echo "usage: $0 [--no-build]" >&2; exit 2 ;;
esac

TARGET_DIR=$(dist_target_dir)
OUT="${PRINTLOOP_DEB_OUT:-$TARGET_DIR/debian}"
ARCHES="${PRINTLOOP_DEB_ARCHES:-amd64 arm64 armhf}"
MAINTAINER="${PRINTLOOP_DEB_MAINTAINER:-printloop maintainers <printloop@users.noreply.github.com>}"
LINTIAN_LEFT=non-standard-file-perm

# help2man makes the man pages from each binary's --help, run under qemu-user for arm64 and armhf.
apt_install_missing dpkg file binutils lintian systemd python3 help2man qemu-user-static \
  libc6-arm64-cross libgcc-s1-arm64-cross libc6-armhf-cross libgcc-s1-armhf-cross

# The targets of the architectures asked for.
wanted() { [[ " $ARCHES " == *" $(deb_arch "$1") "* ]]; }
if [ $build -eq 1 ]; then
  triples=()
  for t in "${DIST_TRIPLES[@]}"; do wanted "$t" && triples+=("$t"); done
  scripts/cross.sh "${triples[@]}"
fi

# One timestamp for every file in the packages (reproducible builds): the commit's, else now.
# Exported only now: cargo rebuilds crates whose build scripts watch SOURCE_DATE_EPOCH.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

# What each package is made of. Binary, crate, config files (in /etc/printloop/, from where),
# docs, targets, and the control file's description.
declare -A PKG_BIN=([printloop-gateway]=printloop-gateway [printloop]=printloop)
declare -A PKG_CRATE=([printloop-gateway]=gateway [printloop]=printloop)
declare -A PKG_CONF=(
  [printloop-gateway]="packaging/etc/gateway.toml"
  [printloop]="packaging/etc/supervisor.toml broker.toml"
)
declare -A PKG_DOCS=(
  [printloop-gateway]="docs/gateway.md:README.md"
  [printloop]="docs/supervisor.md:README.md docs/broker.md:broker.md"
)
declare -A PKG_TRIPLES=(
  [printloop-gateway]="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf"
  [printloop]="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu"
)
declare -A PKG_DESC=(
  [printloop-gateway]="gateway for one 3D printer of a printloop print farm (MQTT)
 printloop-gateway drives one 3D printer (Marlin firmware) over its USB serial
 port and connects it to a printloop print farm over MQTT. It keeps the
 printer's state and job ledger in a local database, publishes them as
 retained MQTT messages, and carries on printing when the network, the broker
 or the supervisor is gone.
 .
 Set id, broker.url and serial.port in /etc/printloop/gateway.toml, then run
 systemctl restart printloop-gateway."
  [printloop]="supervisor, MQTT broker and operator CLI of a printloop print farm
 printloop runs a farm of 3D printers over MQTT. This package holds the
 supervisor (job queue, dispatch and recovery; Prometheus metrics; Home
 Assistant discovery) with its embedded MQTT broker, run by printloop.service,
 and the operator's command line tool (printloop jobs, printers, watch, ...).
 .
 The gateway that drives each printer is in the printloop-gateway package."
)

declare -A MAN_NAME=(
  [printloop-gateway]="drive one 3D printer for a printloop print farm over MQTT"
  [printloop]="run and operate a printloop print farm: supervisor, MQTT broker, operator tools"
)

# The man page of a binary, from its own --help (help2man), through a wrapper named like it that
# runs it under qemu-user when it is not an amd64 binary; prints the page's path.
man_page() {
  local bin="$1" triple="$2" ver="$3" name dir
  name=$(basename "$bin") dir="$OUT/man/$triple"
  mkdir -p "$dir"
  printf '#!/bin/sh\nexec %s "%s" "$@"\n' "$(dist_runner "$triple")" "$bin" >"$dir/$name"
  chmod 0755 "$dir/$name"
  help2man --no-info --section=1 --version-string="$ver" --name="${MAN_NAME[$name]}" "$dir/$name" |
    gzip -9n >"$dir/$name.1.gz"
  echo "$dir/$name.1.gz"
}

# dpkg-gencontrol's Installed-Size: KiB per file rounded up, 1 per directory or link.
installed_size() {
  find "$1" -path "$1/DEBIAN" -prune -o -mindepth 1 \( -type f -printf '%s\n' -o -printf '1024\n' \) |
    awk '{ kib += int(($1 + 1023) / 1024) } END { print kib }'
}

# Depends, from the ELF's needs.
depends_of() {
  local bin="$1" deps floor
  floor=$(glibc_floor "$bin")
  deps="libc6 (>= $floor)"
  if elf_needed "$bin" | grep -q '^libgcc_s\.so'; then
    floor=$(libgcc_floor "$bin")
    deps+=", libgcc-s1${floor:+ (>= ${floor%.0})}"
  fi
  for lib in $(elf_needed "$bin"); do
    case "$lib" in
      libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux*.so.*) ;;
      libgcc_s.so.1) ;;
      *) echo "FAIL: $bin links $lib, which package.sh does not know how to depend on" >&2; return 1 ;;
    esac
  done
  echo "$deps, adduser"
}

# Builds one package; prints its path.
build_deb() {
  local pkg="$1" triple="$2" arch ver bin root deb f src dst conffile
  arch=$(deb_arch "$triple")
  ver="${PRINTLOOP_DEB_VERSION:-$(crate_version "${PKG_CRATE[$pkg]}")}"
  bin=$(dist_bin_path "$triple" "${PKG_BIN[$pkg]}")
  [ -x "$bin" ] || { echo "FAIL: $bin is missing: run scripts/cross.sh" >&2; return 1; }
  check_elf_arch "$triple" "$bin"
  root="$OUT/stage/${pkg}_${arch}"
  deb="$OUT/${pkg}_${ver}_${arch}.deb"
  rm -rf "$root"
  install -d -m 0755 "$root/DEBIAN"

  install -D -m 0755 "$bin" "$root/usr/bin/${PKG_BIN[$pkg]}"
  install -D -m 0644 "$(man_page "$bin" "$triple" "$ver")" "$root/usr/share/man/man1/${PKG_BIN[$pkg]}.1.gz"
  install -D -m 0644 "packaging/systemd/$pkg.service" "$root/lib/systemd/system/$pkg.service"
  : >"$root/DEBIAN/conffiles"
  for f in ${PKG_CONF[$pkg]}; do
    conffile="/etc/printloop/$(basename "$f")"
    install -D -m 0640 "$f" "$root$conffile"
    echo "$conffile" >>"$root/DEBIAN/conffiles"
  done

  local doc="$root/usr/share/doc/$pkg"
  install -D -m 0644 packaging/debian/copyright "$doc/copyright"
  for f in ${PKG_DOCS[$pkg]}; do
    src="${f%%:*}" dst="${f##*:}"
    gzip -9n <"$src" >"$doc/$dst.gz"
  done
  {
    echo "$pkg ($ver) unstable; urgency=medium"
    echo
    echo "  * Built by scripts/package.sh from commit $commit."
    echo
    echo " -- $MAINTAINER  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
  } | gzip -9n >"$doc/changelog.gz"
  chmod 0644 "$doc"/*.gz

  for f in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$pkg/$f" "$root/DEBIAN/$f"
  done
  cat >"$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $ver
Architecture: $arch
Maintainer: $MAINTAINER
Installed-Size: $(installed_size "$root")
Depends: $(depends_of "$bin")
Section: misc
Priority: optional
Description: ${PKG_DESC[$pkg]}
EOF
  # md5sums of every file but the conffiles (dpkg keeps those in its status), as dh_md5sums does.
  (cd "$root" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' |
    LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
  chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

  dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
  echo "$deb"
}

rm -rf "$OUT/man" "$OUT/stage" && mkdir -p "$OUT"
start=$SECONDS
debs=()
for pkg in printloop-gateway printloop; do
  for triple in ${PKG_TRIPLES[$pkg]}; do
    wanted "$triple" || continue
    debs+=("$(build_deb "$pkg" "$triple")")
  done
done
echo "built in $((SECONDS - start)) s:"
for d in "${debs[@]}"; do
  printf '  %-58s %6d KiB  Depends: %s\n' "${d#"$PWD"/}" $(($(stat -c %s "$d") / 1024)) \
    "$(dpkg-deb -f "$d" Depends)"
done

# --- the units: systemd-analyze ---------------------------------------------------------------
# `verify` needs the ExecStart binary at its path: verify a copy whose ExecStart points at the
# staged binary (scripts/package-test.sh verifies the installed unit at its real path too). Any
# staged architecture will do: verify only needs an executable file there. --man=no: the man page
# of Documentation= is not installed on the build machine.
echo
fail=0
verify_dir=$(mktemp -d)
trap 'rm -rf "$verify_dir"' EXIT
for pkg in printloop-gateway printloop; do
  unit="packaging/systemd/$pkg.service"
  staged=$(ls "$OUT"/stage/"${pkg}"_*/usr/bin/"${PKG_BIN[$pkg]}" | head -1)
  sed "s|^ExecStart=/usr/bin/${PKG_BIN[$pkg]} |ExecStart=$staged |" "$unit" >"$verify_dir/$pkg.service"
  if out=$(systemd-analyze verify --man=no "$verify_dir/$pkg.service" 2>&1) && [ -z "$out" ]; then
    echo "systemd-analyze verify $unit: clean"
  else
    echo "FAIL: systemd-analyze verify $unit:"; echo "$out"; fail=1
  fi
  exposure=$(systemd-analyze security --offline=yes --no-pager "$unit" | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  echo "systemd-analyze security --offline=yes $unit: exposure $exposure (target <= 2.0)"
  awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.0) }' || { echo "FAIL: exposure $exposure > 2.0"; fail=1; }
done

# --- lintian ----------------------------------------------------------------------------------
echo
start=$SECONDS
[ "${PRINTLOOP_DEB_LINTIAN:-1}" = 0 ] && debs=() && echo "lintian skipped (PRINTLOOP_DEB_LINTIAN=0)"
for d in "${debs[@]}"; do
  if lintian --fail-on error,warning --suppress-tags "$LINTIAN_LEFT" "$d"; then
    echo "lintian ${d##*/}: clean (left on purpose: see the top of scripts/package.sh)"
  else
    echo "FAIL: lintian ${d##*/}"; fail=1
  fi
done
echo "lintian took $((SECONDS - start)) s"

[ $fail -eq 0 ] || { echo "package.sh: FAILED (see FAIL above)"; exit 1; }
echo "packages: ${OUT#"$PWD"/}/"
