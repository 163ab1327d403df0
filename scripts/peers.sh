#!/usr/bin/env bash
# Runs printloop against the real programs users run beside it: Home Assistant (MQTT discovery,
# availability, the pause button), Node-RED (the shipped flow), OctoPrint's client (a slicer's
# upload) and Chromium (the dashboard). Installs them on first use into
# ${PRINTLOOP_PEERS_DIR:-$HOME/.cache/printloop-peers} (Home Assistant 2024.3.3 from PyPI in a venv,
# Node-RED 4 from npm, OctoPrint 1.11.8 from PyPI for its client; Debian's chromium and
# chromium-driver from apt), then runs each peer's test. Fails if any fails; never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
for peer in home-assistant node-red octoprint browser; do
  echo "=== peer: $peer ($(date -u +%H:%M:%S))"
  start=$(date +%s)
  if timeout 1200 "./scripts/peer-$peer.sh"; then
    echo "=== peer $peer: ok in $(( $(date +%s) - start )) s"
  else
    rc=$?
    echo "=== peer $peer: FAILED (exit $rc) after $(( $(date +%s) - start )) s"
    status=1
  fi
done
exit $status
