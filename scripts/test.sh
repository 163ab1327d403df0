#!/usr/bin/env bash
# Runs printloop's whole test suite on a fresh Debian machine: installs what the tests drive
# for real (Mosquitto and its clients; openssl for the TLS tests; iproute2 for a network namespace), then `cargo test` over every crate.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# tests/broker_auth.rs runs the embedded broker on a non-loopback address in its own network
# namespace (unshare from util-linux, ip from iproute2; it needs root, as CI has).
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (the interop tests run a real Mosquitto)"
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need[@]}" >/dev/null
fi

exec cargo test --workspace "$@"
