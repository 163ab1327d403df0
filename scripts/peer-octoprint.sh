#!/usr/bin/env bash
# Installs OctoPrint 1.11.8 from PyPI into a venv under
# ${PRINTLOOP_PEERS_DIR:-$HOME/.cache/printloop-peers}/octoprint on first use (about 25-40 s,
# about 210 MB), or checks the one already there (well under a second), and prints the path of its
# `octoprint` executable (progress goes to stderr); then runs tests/peer_octoprint.rs, whose
# `octoprint client ... upload` is a slicer-compatible OctoPrint API client nobody here wrote
# (`--install-only`: install and print the path, run nothing). By hand:
#   octo=$(scripts/peer-octoprint.sh)
#   "$octo" client --host 127.0.0.1 --port PORT --apikey KEY \
#     upload /api/files/local part.gcode -P print true -P select true
# Note: the client exits 0 whatever the HTTP status; check its "Status Code: 201" line.
# Exits non-zero on any failure; never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

OCTOPRINT_VERSION=1.11.8
peers="${PRINTLOOP_PEERS_DIR:-$HOME/.cache/printloop-peers}"
venv="$peers/octoprint"
octo="$venv/bin/octoprint"
marker="$venv/.printloop-installed"

install_octoprint() {
  command -v python3 >/dev/null || { echo "python3 is required" >&2; exit 1; }
  echo "installing OctoPrint $OCTOPRINT_VERSION into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$peers"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "octoprint==$OCTOPRINT_VERSION" >&2
  "$octo" --version >&2
  # Written last: a half-finished install is never taken for a good one.
  echo "$OCTOPRINT_VERSION" > "$marker"
}

installed=""
[ -x "$octo" ] && [ -f "$marker" ] && installed=$(cat "$marker")
if [ "$installed" != "$OCTOPRINT_VERSION" ] \
   || ! timeout 60 "$octo" --version 2>/dev/null | grep -qx "octoprint, version $OCTOPRINT_VERSION"; then
  t0=$(date +%s)
  timeout 900 bash -c "$(declare -f install_octoprint); venv='$venv' peers='$peers' octo='$octo' \
    marker='$marker' OCTOPRINT_VERSION='$OCTOPRINT_VERSION' install_octoprint"
  echo "OctoPrint installed in $(( $(date +%s) - t0 )) s" >&2
fi
if [ "${1:-}" = "--install-only" ]; then
  echo "$octo"
  exit 0
fi
t0=$(date +%s)
PRINTLOOP_OCTOPRINT="$octo" timeout 600 cargo test -p printloop --test peer_octoprint -- --ignored --nocapture >&2
echo "real OctoPrint client test passed in $(( $(date +%s) - t0 )) s" >&2
