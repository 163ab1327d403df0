#!/usr/bin/env bash
# Boots the Raspberry Pi image in qemu-system-aarch64 (the virt machine, a Cortex-A72, TCG: no
# KVM) and waits for its gateway to come online on a broker on this machine. Too slow for CI; run
# by hand after scripts/build-image.sh:
#
#   scripts/image-boot-test.sh [target/image/printloop-gateway-<version>-arm64.img]
#
# What it does, every wait bounded:
#  1. copies the image (the original is never touched) and makes the copy 1 GiB larger, so the
#     first boot's growroot has something to grow;
#  2. writes a test boot file into the copy's FAT partition (mtools): id p1, the broker, a
#     serial port, and a [system] section with a host name, a time zone, Wi-Fi (the VM has no
#     Wi-Fi: only the file is checked) and a throwaway ssh key;
#  3. starts mosquitto on 127.0.0.1:<free port>, and, when target/release/printloop (or $PRINTLOOP)
#     exists, a
#     simulated printer (`printloop sim`) whose pty becomes the guest's /dev/ttyUSB0 (QEMU's
#     usb-serial);
#  4. boots the image's own kernel and initrd (taken from the FAT partition) with root on
#     virtio-blk; the kernel command line is cmdline.txt's with the virt console (ttyAMA0).
#     Networking is QEMU's user mode with restrict=on: the guest reaches nothing but what is
#     forwarded: guest 10.0.2.100:1883 -> the broker (a socat per connection), host
#     127.0.0.1:<port> -> guest ssh;
#  5. waits (BOOT_TEST_TIMEOUT, default 600 s) for a retained printloop/v1/printers/p1/status with
#     "online" and an epoch; then over ssh checks what first boot did (host name, time zone, the
#     grown root, the renamed boot file without passwords, the units), powers the guest off and
#     reads the FAT partition of the copy again;
#  6. prints the timings (boot to online) and kills everything it started.
#
# Needs: qemu-system-arm (bookworm's 7.2 is enough), mosquitto, mosquitto-clients, socat, mtools,
# fdisk, openssh-client; installed when missing and running as root.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/dist-lib.sh
. scripts/dist-lib.sh
export MTOOLS_SKIP_CHECK=1
TIMEOUT=${BOOT_TEST_TIMEOUT:-600}
MEM=${BOOT_TEST_MEM:-1024}

img=${1:-$(ls -1t "$(dist_target_dir)"/image/printloop-gateway-*-arm64.img 2>/dev/null | head -1 || true)}
[ -n "$img" ] && [ -f "$img" ] || { echo "image-boot-test.sh: no image (run scripts/build-image.sh first)" >&2; exit 1; }
img=$(readlink -f "$img")
if [ "$(id -u)" -eq 0 ]; then
  apt_install_missing qemu-system-arm mosquitto mosquitto-clients socat mtools fdisk openssh-client
fi

fails=0
pass() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; fails=$((fails + 1)); }
check() { local what=$1; shift; if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi; }
not() { ! "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

T=$(mktemp -d /tmp/printloop-boot-test.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 1. the copy --------------------------------------------------------------------------------
echo "image: $img"
t=$(now)
cp --sparse=always "$img" "$T/disk.img"
truncate -s +1G "$T/disk.img"
dump=$(sfdisk -d "$T/disk.img")
b_start=$(grep "^$T/disk.img1 " <<<"$dump" | sed -n 's/.*start= *\([0-9]*\).*/\1/p')
BOOT="$T/disk.img@@$((b_start * 512))"
mcopy -n -i "$BOOT" ::/config.txt ::/cmdline.txt "$T/"
kernel=$(sed -n 's/^kernel=//p' "$T/config.txt" | tail -1)
initrd=$(sed -n 's/^initramfs \([^ ]*\).*/\1/p' "$T/config.txt" | tail -1)
mcopy -n -i "$BOOT" "::/$kernel" "$T/vmlinuz"
mcopy -n -i "$BOOT" "::/$initrd" "$T/initrd"
# The Pi's consoles (ttyS1, tty0) become the virt machine's PL011 (ttyAMA0).
append="$(sed -E 's/console=[^ ]+ ?//g' "$T/cmdline.txt" | tr -s ' ') console=ttyAMA0,115200"
echo "kernel $kernel, initrd $initrd; cmdline: $append"

# --- 2. the boot file ---------------------------------------------------------------------------
BROKER_PORT=$(free_port)
SSH_PORT=$(free_port)
ssh-keygen -q -t ed25519 -N '' -C boot-test -f "$T/id_ed25519"
MQTT_SECRET="mqtt-pw-$RANDOM$RANDOM"
WIFI_SECRET="wifi-pw-$RANDOM$RANDOM"
cat >"$T/printloop-gateway.toml" <<EOF
# written by scripts/image-boot-test.sh
id = "p1"
name = "boot test"
tags = ["pla"]

[broker]
url = "mqtt://10.0.2.100:1883"
username = "p1"
password = "$MQTT_SECRET"

[serial]
port = "/dev/ttyUSB0"
baud = 250000

[timing]
heartbeat_s = 5

[system]
hostname = "boot-test-p1"
timezone = "Europe/Berlin"
wifi_ssid = "test-net"
wifi_password = "$WIFI_SECRET"
wifi_country = "DE"
ssh_authorized_key = "$(cat "$T/id_ed25519.pub")"
EOF
mcopy -o -i "$BOOT" "$T/printloop-gateway.toml" ::/printloop-gateway.toml
echo "prepared the copy in $(since "$t") s"

# --- 3. broker and printer ----------------------------------------------------------------------
cat >"$T/mosquitto.conf" <<EOF
listener $BROKER_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
EOF
mosquitto -c "$T/mosquitto.conf" 2>"$T/mosquitto.log" &
pids+=($!)
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$BROKER_PORT") 2>/dev/null && break
  sleep 0.2
done
sim=()
PRINTLOOP=${PRINTLOOP:-$(dist_target_dir)/release/printloop}
if [ -x "$PRINTLOOP" ]; then
  "$PRINTLOOP" sim --link "$T/printer.tty" --advanced-ok --motion-speed 20000 >"$T/sim.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do [ -e "$T/printer.tty" ] && break; sleep 0.1; done
  # shellcheck disable=SC2054 # QEMU option values, not array separators
  [ -e "$T/printer.tty" ] && sim=(-device qemu-xhci -chardev "serial,id=printer,path=$(readlink -f "$T/printer.tty")" -device usb-serial,chardev=printer)
  echo "simulated printer on $(readlink -f "$T/printer.tty") -> guest /dev/ttyUSB0"
else
  echo "no $PRINTLOOP: no simulated printer (the gateway comes online without one)"
fi

# Everything retained under the printer, recorded from now on.
mosquitto_sub -h 127.0.0.1 -p "$BROKER_PORT" -t 'printloop/v1/printers/p1/#' -v >"$T/mqtt.log" 2>&1 &
pids+=($!)

# --- 4. boot --------------------------------------------------------------------------------------
t_boot=$(now)
qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m "$MEM" -nographic -no-reboot \
  -kernel "$T/vmlinuz" -initrd "$T/initrd" -append "$append" \
  -drive "if=none,id=disk,format=raw,file=$T/disk.img" -device virtio-blk-pci,drive=disk \
  -netdev "user,id=net,restrict=on,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22,guestfwd=tcp:10.0.2.100:1883-cmd:socat - TCP:127.0.0.1:$BROKER_PORT" \
  -device virtio-net-pci,netdev=net,romfile= \
  "${sim[@]}" \
  -serial "file:$T/console.log" -monitor none </dev/null >"$T/qemu.log" 2>&1 &
QEMU=$!
pids+=("$QEMU")
echo "qemu started (pid $QEMU); console: $T/console.log; waiting up to $TIMEOUT s for p1 online"

# --- 5. wait for online ---------------------------------------------------------------------------
online=""
deadline=$((SECONDS + TIMEOUT))
while [ $SECONDS -lt $deadline ]; do
  if line=$(grep -m1 'printloop/v1/printers/p1/status .*"presence": *"online"' "$T/mqtt.log"); then
    online=$line
    break
  fi
  kill -0 "$QEMU" 2>/dev/null || { echo "qemu exited early:"; cat "$T/qemu.log"; break; }
  sleep 1
done
t_online=$(since "$t_boot")
marks() { grep -a -m1 "$1" "$T/console.log" >/dev/null; }
if [ -n "$online" ]; then
  pass "p1 online after $t_online s: $online"
  check "status carries an epoch" grep -q '"epoch":[0-9]' <<<"$online"
else
  fail "p1 not online within $TIMEOUT s"
  echo "--- last console lines"; tail -40 "$T/console.log" | sed 's/^/      /'
fi
check "the console shows no first-boot failure" not marks 'FIRST-BOOT CONFIGURATION FAILED'
check "the initramfs checked / before mounting it (e2fsck: clean)" marks 'RASPIROOT: clean, '
check "no password in the console log" not grep -aq -e "$MQTT_SECRET" -e "$WIFI_SECRET" "$T/console.log"
check "no password in the MQTT traffic" not grep -aq -e "$MQTT_SECRET" -e "$WIFI_SECRET" "$T/mqtt.log"

# Over ssh (first boot turned it on with the key above).
SSH=(ssh -q -i "$T/id_ed25519" -p "$SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
  -o ConnectTimeout=10 -o BatchMode=yes root@127.0.0.1)
if [ -n "$online" ]; then
  ok_ssh=""
  for _ in $(seq 12); do
    if timeout 30 "${SSH[@]}" true 2>/dev/null; then ok_ssh=1; break; fi
    sleep 5
  done
  if [ -n "$ok_ssh" ]; then
    pass "ssh with the boot file's key"
    remote() { timeout 60 "${SSH[@]}" "$@" 2>&1; }
    check "host name boot-test-p1" test "$(remote hostname)" = boot-test-p1
    check "time zone Europe/Berlin" test "$(remote readlink /etc/localtime)" = /usr/share/zoneinfo/Europe/Berlin
    check "printloop-gateway.service active" test "$(remote systemctl is-active printloop-gateway.service)" = active
    check "gateway config written from the boot file" grep -q '^id = "p1"' <<<"$(remote cat /etc/printloop/gateway.toml)"
    check "printloop-firstboot succeeded" test "$(remote systemctl show -p Result --value printloop-firstboot.service)" = success
    check "printloop-growroot succeeded" test "$(remote systemctl show -p Result --value printloop-growroot.service)" = success
    check "gateway config is 0640 root:printloop-gateway" test "$(remote "stat -c '%a %U:%G' /etc/printloop/gateway.toml")" = "640 root:printloop-gateway"
    check "Wi-Fi config written, 0600" test "$(remote "stat -c %a /etc/wpa_supplicant/wpa_supplicant-wlan0.conf")" = 600
    check "boot file renamed to .applied" test "$(remote ls /boot/firmware/ | grep -c '^printloop-gateway.toml.applied$')" = 1
    check "no password left on the FAT partition" test "$(remote "grep -rl -e '$MQTT_SECRET' -e '$WIFI_SECRET' /boot/firmware/ | wc -l")" = 0
    root_mb=$(remote df -m --output=size / | tail -1 | tr -d ' ')
    img_root_mb=$(( $(sfdisk -d "$img" | grep "^${img}2 " | sed -n 's/.*size= *\([0-9]*\).*/\1/p') / 2048 ))
    check "root grown to fill the disk (${root_mb} MiB > image's ${img_root_mb} MiB)" test "${root_mb:-0}" -gt "$img_root_mb"
    check "journal in RAM (no /var/log/journal)" test "$(remote 'test -d /var/log/journal && echo yes || echo no')" = no
    check "/ mounted noatime" grep -q noatime <<<"$(remote findmnt -no OPTIONS /)"
    check "no failed units" test "$(remote systemctl --failed --no-legend --plain | grep -v wpa_supplicant | wc -l)" = 0
    remote systemctl --failed --no-legend --plain | sed 's/^/      failed: /'
    echo "      $(remote systemd-analyze 2>/dev/null | head -1)"
    if [ ${#sim[@]} -gt 0 ]; then
      t=$(now)
      for _ in $(seq 120); do grep -q 'printers/p1/state .*"phase": *"idle"' "$T/mqtt.log" && break; sleep 1; done
      check "the gateway talks to the simulated printer on /dev/ttyUSB0 (state idle, $(since "$t") s after online)" \
        grep -q 'printers/p1/state .*"phase": *"idle"' "$T/mqtt.log"
    fi
    remote systemctl poweroff >/dev/null 2>&1 || true
  else
    fail "ssh with the boot file's key"
  fi
fi

# --- 6. the end -----------------------------------------------------------------------------------
for _ in $(seq 60); do kill -0 "$QEMU" 2>/dev/null || break; sleep 1; done
kill "$QEMU" 2>/dev/null || true
sleep 1
mdir -b -i "$BOOT" ::/ >"$T/bootfiles" 2>/dev/null || true
check "after shutdown: the FAT has printloop-gateway.toml.applied" grep -q 'printloop-gateway.toml.applied$' "$T/bootfiles"
check "after shutdown: no printloop-gateway.toml, no error file" not grep -q 'printloop-gateway.toml$\|error.txt$' "$T/bootfiles"
mcopy -n -i "$BOOT" ::/printloop-gateway.toml.applied "$T/applied" 2>/dev/null || true
check "after shutdown: .applied holds no password" not grep -q -e "$MQTT_SECRET" -e "$WIFI_SECRET" "$T/applied"

echo
echo "boot to online: ${t_online} s (qemu TCG, -smp 2, ${MEM} MiB; includes first boot: growroot, firstboot, ssh keys)"
if [ "$fails" -eq 0 ]; then echo "image-boot-test.sh: all checks passed"; else echo "image-boot-test.sh: $fails check(s) FAILED" >&2; exit 1; fi
