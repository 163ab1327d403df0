#!/bin/sh
# The long steady-state run of issue #13, too long for CI (which runs a 300-printer version):
# 10 000 fake printers on Mosquitto printing 20-60 s jobs; 60 s steady window (half of it with
# 10 dashboard streams), a broker kill and restart, then SOAK_S more seconds of printing with
# the supervisor killed -9 half way. Prints dispatch latency per phase, the reconcile times and
# the supervisor's RSS at each step, then one JSON line (docs/supervisor.md, "Performance").
#
#   scripts/fleet-soak.sh                 # 10 000 printers, 600 s, Mosquitto (~13 min)
#   PRINTERS=2000 BROKER=rumqttd scripts/fleet-soak.sh
set -eu
cd "$(dirname "$0")/.."
printers=${PRINTERS:-10000}
soak=${SOAK_S:-600}
broker=${BROKER:-mosquitto}
exec cargo bench -p supervisor --bench fleet -- --printers "$printers" --duration 60 \
  --soak "$soak" --print-ms 20000..60000 --broker "$broker"
