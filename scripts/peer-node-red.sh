#!/usr/bin/env bash
# Runs the shipped Node-RED flow (docs/node-red/flow.json) in a real, headless Node-RED 4 against
# a real fleet (simulated printers, printloop-gateway and printloop supervisor processes, on
# Mosquitto and on the embedded rumqttd): state arrives in Node-RED, "bed cleared" and "submit job"
# go through the supervisor API, a pause and a resume pressed in the flow reach the gateway.
#
# Installs Node-RED 4 from npm on first use into
# ${PRINTLOOP_PEERS_DIR:-$HOME/.cache/printloop-peers}/node-red (about 20-40 s), then runs
# `cargo test --test peer_node_red -- --include-ignored` with PRINTLOOP_NODE_RED set. Every step is
# bounded; exits non-zero on any failure, never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

peers="${PRINTLOOP_PEERS_DIR:-$HOME/.cache/printloop-peers}"
nr_dir="$peers/node-red"
nr="$nr_dir/node_modules/.bin/node-red"

command -v node >/dev/null 2>&1 || { echo "node not found: Node-RED 4 needs Node.js 18 or newer"; exit 1; }
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || { echo "Node.js $(node --version) is too old: Node-RED 4 needs 18 or newer"; exit 1; }

if [ ! -x "$nr" ]; then
  command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js 18+ with npm"; exit 1; }
  mkdir -p "$nr_dir"
  echo "installing Node-RED 4 into $nr_dir"
  timeout 600 npm install --prefix "$nr_dir" --no-audit --no-fund --loglevel=error node-red@4
fi
echo "Node-RED $(node -p "require('$nr_dir/node_modules/node-red/package.json').version") at $nr"
[ "$(node -p "require('$nr_dir/node_modules/node-red/package.json').version.split('.')[0]")" = 4 ] \
  || { echo "expected Node-RED 4 in $nr_dir: remove it to reinstall"; exit 1; }

# The test starts printloop-gateway processes: build them beside the test binary.
timeout 1200 cargo build -p gateway --bin printloop-gateway
timeout 1200 cargo test -p printloop --test peer_node_red --no-run
start=$(date +%s)
PRINTLOOP_NODE_RED="$nr" timeout 600 \
  cargo test -p printloop --test peer_node_red -- --include-ignored --nocapture --test-threads 1
echo "peer-node-red: ok in $(( $(date +%s) - start )) s (tests, after the build)"
