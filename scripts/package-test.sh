#!/usr/bin/env bash
# The proof that the Debian packages from scripts/package.sh work (run it after package.sh):
#
# 1. contents: every .deb holds its binary, its unit and its conffiles; the arm64/armhf binaries
#    are for their architecture (`file`), and run under qemu-user (--version).
# 2. lifecycle, in a minimal Debian bookworm amd64 chroot (mmdebstrap; the tarball is cached in
#    $TARGET/package-test/), for each amd64 package: install -> the binary runs from /usr/bin, the
#    system user exists (the gateway's is in dialout), its /var/lib/printloop/<part> is its own,
#    its configs are 0640 root:<group> and readable by the service, the unit is enabled and
#    `systemd-analyze verify` is clean at its real path -> the operator edits the config ->
#    upgrade to <ver>+1 (built with PRINTLOOP_DEB_VERSION), non-interactively, with dpkg's own
#    conffile logic (no --force-conf*) -> the edit and the state survived -> remove (configs and
#    state stay) -> purge -> the chroot's file list, /etc/passwd, group, shadow and gshadow are
#    exactly as before the install. Then both packages side by side, purged one after the other.
# 3. the arm64 gateway for real: its binary from the arm64 .deb under qemu-aarch64-static, against
#    the broker of the amd64 printloop .deb (`printloop broker`) on free loopback ports. Over MQTT
#    (mosquitto_sub, retained `status`): online with epoch N; kill -9 -> its will says offline
#    with the same epoch N; restarted -> online with an epoch > N.
# 4. the units under a real systemd: the chroot with both amd64 packages boots in systemd-nspawn;
#    the hardened services run, Type=notify sees READY=1, the watchdog is fed past WatchdogSec,
#    the unconfigured gateway stops with 78 and is not restarted, the configured one reaches the
#    supervisor's embedded broker.
#
# Every wait is bounded. Prints each check; exits non-zero if any failed.
#   scripts/package-test.sh
# Needs root (chroot, nspawn). Installs what it needs with apt (mmdebstrap, qemu-user-static, the
# arm64 and armhf libc for qemu, mosquitto-clients, systemd-container).
# PRINTLOOP_DEBIAN_MIRROR overrides the chroot's mirror.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
# shellcheck source=scripts/dist-lib.sh
. scripts/dist-lib.sh

TARGET_DIR=$(dist_target_dir)
DEBS="$TARGET_DIR/debian"
WORK="$TARGET_DIR/package-test"
TARBALL="$WORK/bookworm-amd64.tar"
MIRROR="${PRINTLOOP_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROOT="$WORK/root"

[ "$(id -u)" -eq 0 ] || { echo "package-test.sh needs root (chroot, dpkg in the chroot)" >&2; exit 2; }
apt_install_missing mmdebstrap qemu-user-static libc6-arm64-cross libgcc-s1-arm64-cross \
  libc6-armhf-cross libgcc-s1-armhf-cross mosquitto-clients file binutils python3 util-linux \
  systemd-container
mkdir -p "$WORK"

# --- checks: each prints one line; a failure is counted, the run goes on ------------------------
passed=0 failed=0
ok() { echo "  ok    $*"; passed=$((passed + 1)); }
bad() { echo "  FAIL  $*"; failed=$((failed + 1)); }
# check "what" command...: ok when the command succeeds.
check() {
  local what="$1"; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
# check_eq "what" expected actual
check_eq() {
  if [ "$2" = "$3" ]; then ok "$1: $3"; else bad "$1: expected '$2', got '$3'"; fi
}
section() { echo; echo "=== $*"; }
# Helpers for check: `not CMD...`, `all CMD1... -- CMD2...` (both must succeed).
not() { ! "$@"; }
all() {
  local first=()
  while [ "$1" != -- ]; do first+=("$1"); shift; done
  shift
  "${first[@]}" && "$@"
}
# is_conffile DEB PATH LISTING: shipped 0640 root/root, and listed in DEBIAN/conffiles.
is_conffile() {
  grep -qxF -- "-rw-r----- root/root .$2" <<<"$3" && dpkg-deb -I "$1" conffiles | grep -qxF "$2"
}
# no_dpkg_copies FILE: dpkg left no FILE.dpkg-dist/-old/-new beside it (no conffile conflict).
no_dpkg_copies() { ! compgen -G "$1.dpkg-*" >/dev/null; }

ver="${PRINTLOOP_DEB_VERSION:-$(crate_version gateway)}"
sup_ver="${PRINTLOOP_DEB_VERSION:-$(crate_version printloop)}"
deb_of() { echo "$DEBS/${1}_${2}_${3}.deb"; } # package version arch

# =============================================================================================
section "contents of every .deb (dpkg-deb -c)"
declare -A CONFS=(
  [printloop-gateway]="/etc/printloop/gateway.toml"
  [printloop]="/etc/printloop/supervisor.toml /etc/printloop/broker.toml"
)
declare -A BIN=([printloop-gateway]=printloop-gateway [printloop]=printloop)
declare -A TRIPLE=([amd64]=x86_64-unknown-linux-gnu [arm64]=aarch64-unknown-linux-gnu
  [armhf]=armv7-unknown-linux-gnueabihf)
for spec in printloop-gateway:amd64 printloop-gateway:arm64 printloop-gateway:armhf \
  printloop:amd64 printloop:arm64; do
  pkg=${spec%%:*} arch=${spec##*:}
  v=$ver; [ "$pkg" = printloop ] && v=$sup_ver
  deb=$(deb_of "$pkg" "$v" "$arch")
  if [ ! -f "$deb" ]; then bad "$deb exists (run scripts/package.sh)"; continue; fi
  list=$(dpkg-deb -c "$deb" | awk '{ print $1, $2, $6 }')
  for want in "-rwxr-xr-x root/root ./usr/bin/${BIN[$pkg]}" \
    "-rw-r--r-- root/root ./lib/systemd/system/$pkg.service" \
    "-rw-r--r-- root/root ./usr/share/doc/$pkg/copyright"; do
    check "${deb##*/}: $want" grep -qxF -- "$want" <<<"$list"
  done
  for c in ${CONFS[$pkg]}; do
    check "${deb##*/}: -rw-r----- root/root .$c, listed in conffiles" \
      is_conffile "$deb" "$c" "$list"
  done
  check_eq "${deb##*/}: Architecture" "$arch" "$(dpkg-deb -f "$deb" Architecture)"
  x="$WORK/x/${pkg}_$arch"
  rm -rf "$x" && mkdir -p "$x" && dpkg-deb -x "$deb" "$x"
  check "${deb##*/}: $(file -b "$x/usr/bin/${BIN[$pkg]}" | cut -d, -f1-2)" \
    check_elf_arch "${TRIPLE[$arch]}" "$x/usr/bin/${BIN[$pkg]}"
  runner=$(dist_runner "${TRIPLE[$arch]}")
  # shellcheck disable=SC2086 # the runner is a command and its arguments
  out=$(timeout 60 $runner "$x/usr/bin/${BIN[$pkg]}" --version 2>&1) || out="(failed: $out)"
  check_eq "${deb##*/}: ${runner:+under ${runner%% *}: }${BIN[$pkg]} --version" "${BIN[$pkg]} $v" "$out"
done

# =============================================================================================
section "the chroot: Debian bookworm amd64, minbase + adduser + systemd"
if [ ! -s "$TARBALL" ]; then
  start=$SECONDS
  # systemd brings systemd-analyze and init-system-helpers (deb-systemd-helper); it is not started.
  mmdebstrap --variant=minbase --include=adduser,systemd,init-system-helpers --mode=root --format=tar \
    --quiet bookworm "$TARBALL.tmp" "$MIRROR" </dev/null
  mv "$TARBALL.tmp" "$TARBALL"
  echo "built $TARBALL in $((SECONDS - start)) s ($(du -m "$TARBALL" | cut -f1) MiB)"
else
  echo "reusing $TARBALL"
fi
rm -rf "$ROOT" && mkdir -p "$ROOT" && tar -C "$ROOT" -xpf "$TARBALL"
mkdir -p "$ROOT/debs"
# mmdebstrap leaves dpkg's log out; the first dpkg run would create it, which is not our doing.
touch "$ROOT/var/log/dpkg.log"

# Runs a command in the chroot, with /proc (in a private mount namespace: nothing to unmount),
# a clean environment and no stdin: dpkg must never ask.
in_chroot() {
  unshare --mount --fork -- sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$ROOT" \
    /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
    "$@" </dev/null
}
# Everything in the chroot but the kernel's and the runtime's trees: path, owner, mode, type.
# (dpkg's own database, /var/lib/dpkg, is in it: our entries must be gone too.)
snapshot() {
  (cd "$ROOT" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
    -o -path ./tmp -o -path ./debs \) -prune \
    -o -printf '%p %U:%G %m %y\n' | LC_ALL=C sort)
  for f in passwd group shadow gshadow; do sed "s|^|/etc/$f: |" "$ROOT/etc/$f"; done
}
# dpkg -i / --purge in the chroot; its output goes to a log, shown on failure.
dpkg_in() {
  local log="$WORK/dpkg.log"
  if in_chroot dpkg "$@" >"$log" 2>&1; then return 0; fi
  echo "  dpkg $* failed:"; sed 's/^/    /' "$log"; return 1
}

# --- the upgrade: the same packages as <ver>+1 ------------------------------------------------
up_ver="$ver+1" up_sup_ver="$sup_ver+1"
PRINTLOOP_DEB_VERSION="$up_ver" PRINTLOOP_DEB_ARCHES=amd64 PRINTLOOP_DEB_OUT="$WORK/upgrade" \
  PRINTLOOP_DEB_LINTIAN=0 scripts/package.sh --no-build >"$WORK/upgrade.log" 2>&1 ||
  { cat "$WORK/upgrade.log"; echo "building the upgrade packages failed"; exit 1; }
if [ "$up_ver" != "$up_sup_ver" ]; then # the crates' versions differ: build each at its own +1
  PRINTLOOP_DEB_VERSION="$up_sup_ver" PRINTLOOP_DEB_ARCHES=amd64 PRINTLOOP_DEB_OUT="$WORK/upgrade" \
    PRINTLOOP_DEB_LINTIAN=0 scripts/package.sh --no-build >>"$WORK/upgrade.log" 2>&1
fi

# lifecycle PACKAGE VERSION UPGRADE_VERSION USER PART "EXTRA GROUPS" CONF_TO_EDIT
lifecycle() {
  local pkg="$1" v="$2" uv="$3" user="$4" part="$5" groups="$6" edit="$7"
  local bin="${BIN[$pkg]}" unit="$pkg.service" state="/var/lib/printloop/$part" c out
  section "$pkg: install, edit, upgrade $v -> $uv, remove, purge (in the chroot)"
  cp "$(deb_of "$pkg" "$v" amd64)" "$WORK/upgrade/${pkg}_${uv}_amd64.deb" "$ROOT/debs/"
  snapshot >"$WORK/before-$pkg"

  check "dpkg -i ${pkg}_${v}_amd64.deb" dpkg_in -i "/debs/${pkg}_${v}_amd64.deb"
  check_eq "$bin --version, from /usr/bin" "$bin $v" "$(in_chroot "/usr/bin/$bin" --version 2>&1)"
  check_eq "user $user: system user, no login" "/nonexistent /usr/sbin/nologin" \
    "$(in_chroot getent passwd "$user" | awk -F: '$3 < 1000 { print $6, $7 }')"
  check_eq "$user's groups" "$user${groups:+ $groups}" "$(in_chroot id -nG "$user")"
  check_eq "$state" "$user:$user 750" "$(in_chroot stat -c '%U:%G %a' "$state")"
  for c in ${CONFS[$pkg]}; do
    check_eq "$c" "root:$user 640" "$(in_chroot stat -c '%U:%G %a' "$c")"
    check "$c is readable by $user" in_chroot setpriv --reuid="$user" --regid="$user" --init-groups \
      sh -c "cat $c >/dev/null"
  done
  check "$unit enabled (multi-user.target.wants)" \
    test -L "$ROOT/etc/systemd/system/multi-user.target.wants/$unit"
  # --man=no: minbase has no man-db to look up Documentation=man:...
  out=$(in_chroot systemd-analyze verify --man=no "/lib/systemd/system/$unit" 2>&1) || out="(failed) $out"
  check_eq "systemd-analyze verify /lib/systemd/system/$unit" clean "${out:-clean}"
  # The service, as its user, with the packaged config: a configuration error is exit 78 (so
  # systemd does not restart it), and it must not be "cannot read" (permissions).
  if [ "$pkg" = printloop-gateway ]; then
    local rc=0
    out=$(in_chroot setpriv --reuid="$user" --regid="$user" --init-groups \
      "/usr/bin/$bin" --config "$edit" 2>&1) || rc=$?
    check_eq "the unconfigured gateway (id unset), as $user: exit status (EX_CONFIG)" 78 "$rc"
    check "... and it names the missing key: $(tail -1 <<<"$out")" grep -q '`id`' <<<"$out"
  fi

  # The operator edits the config; the service writes state.
  sed -i -e 's/^#id = "p0"/id = "p1"/' -e '1i # edited by the operator (package-test.sh)' "$ROOT$edit"
  echo state >"$ROOT$state/kept-across-upgrades"
  check "dpkg -i ${pkg}_${uv}_amd64.deb (upgrade; no --force-conf*, no stdin)" \
    dpkg_in -i "/debs/${pkg}_${uv}_amd64.deb"
  check_eq "version after the upgrade" "$uv" "$(in_chroot dpkg-query -W -f '${Version}' "$pkg")"
  check "the operator's edit of $edit survived the upgrade" \
    grep -q '^# edited by the operator' "$ROOT$edit"
  check "no $edit.dpkg-* left beside it" \
    no_dpkg_copies "$ROOT$edit"
  check_eq "$edit after the upgrade" "root:$user 640" "$(in_chroot stat -c '%U:%G %a' "$edit")"
  check "the state in $state survived the upgrade" test -f "$ROOT$state/kept-across-upgrades"

  check "dpkg -r $pkg" dpkg_in -r "$pkg"
  check "after remove: the binary is gone" test ! -e "$ROOT/usr/bin/$bin"
  check "after remove: the configs, the state and the user stay" \
    all test -f "$ROOT$edit" -a -d "$ROOT$state" -- grep -q "^$user:" "$ROOT/etc/passwd"
  check "dpkg --purge $pkg" dpkg_in --purge "$pkg"
  snapshot >"$WORK/after-$pkg"
  if diff -u "$WORK/before-$pkg" "$WORK/after-$pkg" >"$WORK/diff-$pkg"; then
    ok "after purge: files, /etc/passwd, group, shadow, gshadow exactly as before the install"
  else
    bad "after purge: the chroot differs from before the install:"; sed 's/^/    /' "$WORK/diff-$pkg"
  fi
}

lifecycle printloop-gateway "$ver" "$up_ver" printloop-gateway gateway dialout /etc/printloop/gateway.toml
lifecycle printloop "$sup_ver" "$up_sup_ver" printloop supervisor "" /etc/printloop/supervisor.toml

section "both packages on one machine: purging one leaves the other whole"
snapshot >"$WORK/before-both"
check "dpkg -i both" dpkg_in -i "/debs/printloop-gateway_${ver}_amd64.deb" "/debs/printloop_${sup_ver}_amd64.deb"
check "dpkg --purge printloop-gateway" dpkg_in --purge printloop-gateway
check "printloop's configs, state and user are still there" \
  all test -f "$ROOT/etc/printloop/supervisor.toml" -a -f "$ROOT/etc/printloop/broker.toml" \
  -a -d "$ROOT/var/lib/printloop/supervisor" -- grep -q "^printloop:" "$ROOT/etc/passwd"
check "dpkg --purge printloop" dpkg_in --purge printloop
check "after both purges: exactly as before" diff -u "$WORK/before-both" <(snapshot)

# =============================================================================================
section "arm64 gateway under qemu-aarch64-static: birth, will, rebirth over MQTT"
arm="$WORK/x/printloop-gateway_arm64/usr/bin/printloop-gateway"
broker_bin="$WORK/x/printloop_amd64/usr/bin/printloop"
run="$WORK/qemu" && rm -rf "$run" && mkdir -p "$run/data"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
p4=$(free_port) p5=$(free_port)
# The packaged broker.toml with our ports (it listens on loopback only).
sed -e "s/127\.0\.0\.1:1883/127.0.0.1:$p4/" -e "s/127\.0\.0\.1:1884/127.0.0.1:$p5/" \
  "$WORK/x/printloop_amd64/etc/printloop/broker.toml" >"$run/broker.toml"
pids=()
# kill -9 and reap (quietly: no "Killed" notice from bash).
stop() { kill -9 "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cleanup() { for p in "${pids[@]}"; do stop "$p"; done; pids=(); }
trap cleanup EXIT
"$broker_bin" broker --config "$run/broker.toml" >"$run/broker.log" 2>&1 &
pids+=($!)
topic=printloop/v1/printers/p1/status
# The retained status as "presence epoch", or nothing (mosquitto_sub waits at most 2 s). The
# payload itself goes to $run/last-status.
status() {
  timeout 5 mosquitto_sub -h 127.0.0.1 -p "$p4" -t "$topic" -C 1 -W 2 2>/dev/null >"$run/last-status" || true
  python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["presence"], m["epoch"])' \
    "$run/last-status" 2>/dev/null || true
}
# wait_status PRESENCE SECONDS: until the retained status says PRESENCE; prints "PRESENCE EPOCH".
wait_status() {
  local deadline=$((SECONDS + $2)) s
  while [ $SECONDS -lt $deadline ]; do
    s=$(status)
    if [ "${s%% *}" = "$1" ]; then echo "$s"; return 0; fi
    sleep 0.5
  done
  echo "timeout (last: ${s:-none})"; return 1
}
gateway() {
  # shellcheck disable=SC2046 # the runner is a command and its arguments
  $(dist_runner aarch64-unknown-linux-gnu) "$arm" --id p1 --broker "mqtt://127.0.0.1:$p4" \
    --serial /nonexistent --data-dir "$run/data" >>"$run/gateway.log" 2>&1 &
  gw=$!
  pids+=("$gw")
}
deadline=$((SECONDS + 20))
until (exec 3<>"/dev/tcp/127.0.0.1/$p4") 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || { cat "$run/broker.log"; bad "the broker listens on $p4"; break; }
  sleep 0.2
done
start=$SECONDS
gateway
if s1=$(wait_status online 90); then
  n=${s1##* }
  ok "online, epoch $n ($((SECONDS - start)) s after the start under qemu): $(cat "$run/last-status")"
  stop "$gw"
  if s2=$(wait_status offline 30); then
    check_eq "after kill -9: its will, offline with the birth's epoch" "offline $n" "$s2"
    check "... and it is the will, not a goodbye (no reason): $(cat "$run/last-status")" \
      not grep -q '"reason"' "$run/last-status"
  else bad "after kill -9: no offline status ($s2)"; fi
  gateway
  if s3=$(wait_status online 90); then
    m=${s3##* }
    check "restarted: online again with epoch $m > $n: $(cat "$run/last-status")" test "$m" -gt "$n"
  else bad "restarted: not online again ($s3)"; fi
  echo "  epochs: birth $n, will ${s2##* }, rebirth ${m:-?}"
else
  bad "the arm64 gateway under qemu never came online ($s1)"; tail -20 "$run/gateway.log"
fi
cleanup

# =============================================================================================
section "the units under a real systemd (systemd-nspawn --boot, private network)"
# Both amd64 packages installed in a fresh copy of the chroot, which then boots: the hardened
# units must run the binaries (sandbox, seccomp filter, device policy), Type=notify must see
# READY=1, the watchdog must be fed for longer than WatchdogSec, an unconfigured gateway must stop
# with 78 and stay stopped, and the configured gateway must reach the supervisor's embedded broker
# (`printloop printers` lists it online). A oneshot unit in the container runs the checks
# (packaging is not involved: it is written here), writes its findings to /boot-test/ and powers
# off.
BOOT="$WORK/boot"
rm -rf "$BOOT" && mkdir -p "$BOOT" && tar -C "$BOOT" -xpf "$TARBALL"
ROOT="$BOOT" # in_chroot works on it now
mkdir -p "$ROOT/debs" "$ROOT/boot-test"
cp "$(deb_of printloop-gateway "$ver" amd64)" "$(deb_of printloop "$sup_ver" amd64)" "$ROOT/debs/"
check "dpkg -i both (systemd not running: enabled, not started)" \
  dpkg_in -i "/debs/printloop-gateway_${ver}_amd64.deb" "/debs/printloop_${sup_ver}_amd64.deb"
cat >"$ROOT/boot-test.sh" <<'EOF'
#!/bin/sh
# Runs inside the booted container (boot-test.service); the host reads /boot-test/.
out=/boot-test
props=Type,ActiveState,SubState,Result,ExecMainStatus,NRestarts,WatchdogUSec
wait_active() { # unit seconds
  i=0
  while [ $i -lt "$2" ] && ! systemctl -q is-active "$1"; do sleep 1; i=$((i + 1)); done
}
wait_active printloop.service 90
# The gateway's first start (unconfigured): exit 78, not restarted. Give RestartSec a chance.
sleep 7
systemctl show -p "$props" printloop-gateway.service >"$out/gateway-unconfigured"
sed -i 's/^#id = "p0"/id = "p1"/' /etc/printloop/gateway.toml
# `restart` returns once READY=1 came (Type=notify), or fails.
systemctl restart printloop-gateway.service >"$out/gateway-restart" 2>&1
echo "restart=$?" >>"$out/gateway-restart"
systemctl show -p NRestarts printloop-gateway.service >"$out/gateway-started"
# Longer than WatchdogSec=30: an unfed watchdog would have killed and restarted them.
sleep 36
systemctl show -p "$props" printloop.service >"$out/supervisor"
systemctl show -p "$props" printloop-gateway.service >"$out/gateway"
timeout 20 printloop printers --json >"$out/printers" 2>&1
journalctl --no-pager -o short-monotonic -u printloop.service -u printloop-gateway.service \
  >"$out/journal" 2>&1
systemctl --no-pager --failed >"$out/failed" 2>&1
systemctl poweroff
EOF
chmod 0755 "$ROOT/boot-test.sh"
cat >"$ROOT/etc/systemd/system/boot-test.service" <<'EOF'
[Unit]
Description=printloop package test (scripts/package-test.sh)
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/boot-test.sh
[Install]
WantedBy=multi-user.target
EOF
ln -s /etc/systemd/system/boot-test.service "$ROOT/etc/systemd/system/multi-user.target.wants/"
start=$SECONDS
# --keep-unit --register=no: needs no systemd on the host (PID 1 here may be something else).
if timeout -k 10 360 systemd-nspawn --quiet --boot --directory="$ROOT" --private-network \
  --keep-unit --register=no >"$WORK/boot.log" 2>&1 </dev/null; then
  ok "the container booted and powered off ($((SECONDS - start)) s)"
else
  bad "the container did not power off by itself (timeout?): $WORK/boot.log"; tail -30 "$WORK/boot.log"
fi
prop() { sed -n "s/^$2=//p" "$ROOT/boot-test/$1" 2>/dev/null; } # file property
check_eq "the unconfigured gateway: stopped with EX_CONFIG, not restarted" \
  "failed exit-code 78 0" "$(prop gateway-unconfigured ActiveState) $(prop gateway-unconfigured Result) $(prop gateway-unconfigured ExecMainStatus) $(prop gateway-unconfigured NRestarts)"
check_eq "the configured gateway: systemctl restart (returns at READY=1)" "restart=0" \
  "$(tail -1 "$ROOT/boot-test/gateway-restart" 2>/dev/null)"
# NRestarts counts systemd's own restarts (a watchdog kill is one): none since the start.
for f in supervisor:printloop.service:0 gateway:printloop-gateway.service:"$(prop gateway-started NRestarts)"; do
  IFS=: read -r file unit n0 <<<"$f"
  check_eq "$unit: Type, state, restarts since the start, watchdog, 36 s after the start" \
    "notify active running ${n0:-?} 30s" \
    "$(for p in Type ActiveState SubState NRestarts WatchdogUSec; do prop "$file" $p; done | xargs)"
done
check "printloop printers (in the container) lists p1 online: $(head -c 200 "$ROOT/boot-test/printers" 2>/dev/null)" \
  python3 -c 'import json, sys
ps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert any(p.get("printer_id") == "p1" and p.get("presence") == "online" for p in ps), ps' \
  "$ROOT/boot-test/printers"
if [ "$failed" -gt 0 ]; then
  echo "  the services' journal in the container ($ROOT/boot-test/journal), last lines:"
  tail -40 "$ROOT/boot-test/journal" 2>/dev/null | sed 's/^/    /'
fi

echo
echo "package-test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
