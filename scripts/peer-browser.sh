#!/usr/bin/env bash
# Runs the dashboard in a real headless Chromium (tests/dashboard_browser.rs) against the demo
# farm. Installs Debian's chromium and chromium-driver first when they are missing (~10 s with
# a warm apt cache). PRINTLOOP_SCREENSHOTS=DIR keeps the grid, queue and history screenshots
# (docs/screenshots/ holds the committed ones). Never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need[@]}" >/dev/null
fi
chromium --version 2>/dev/null | tail -1
t0=$(date +%s)
PRINTLOOP_CHROMEDRIVER="$(command -v chromedriver)" PRINTLOOP_CHROMIUM="$(command -v chromium)" \
  timeout 600 cargo test -p printloop --test dashboard_browser -- --ignored --nocapture
echo "real browser test passed in $(( $(date +%s) - t0 )) s"
