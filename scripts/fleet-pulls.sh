#!/bin/sh
# Files at scale (issue #13), too long for CI (which pulls 10 files of 5 MB in its 300-printer
# run): 1 000 fake printers, the last 50 of them pulling 50 different 50 MB files at once while
# the other 950 print and are dispatched. Uploads the files with the real `printloop jobs add`
# first (~1.5 min), then prints the pulls' speed and the others' dispatch latency meanwhile,
# then one JSON line (`pulls`; docs/supervisor.md, "Files at scale"). Needs ~6 GB of /tmp.
#
#   scripts/fleet-pulls.sh                          # rumqttd (the embedded broker)
#   BROKER=mosquitto PULLERS=50 PULL_MB=200 scripts/fleet-pulls.sh
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p supervisor --bench fleet -- --printers "${PRINTERS:-1000}" \
  --pullers "${PULLERS:-50}" --pull-mb "${PULL_MB:-50}" --duration 10 \
  --print-ms 20000..60000 --broker "${BROKER:-rumqttd}"
