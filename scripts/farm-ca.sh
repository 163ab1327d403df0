#!/usr/bin/env bash
# Makes the farm's own certificate authority and a certificate for the broker, with openssl, for
# MQTT over TLS (Mosquitto's `listener 8883`, printloop's `mqtts://`). docs/raspberry-pi.md walks
# through it; tests/broker_mosquitto_acl.rs and tests/e2e_fleet.rs run this very script.
#
#   scripts/farm-ca.sh OUT_DIR BROKER_NAME [MORE_NAMES_OR_IPS...]
#
# OUT_DIR/ca.pem       the CA certificate: copy it to every Pi (/etc/printloop/ca.pem), to the
#                      supervisor's host and to Home Assistant / Node-RED
# OUT_DIR/ca.key       the CA's private key: keep it offline; only needed to make more certs
# OUT_DIR/server.crt   the broker's certificate, valid for BROKER_NAME and the other names/IPs
# OUT_DIR/server.key   its private key (Mosquitto: certfile / keyfile)
#
# An existing CA in OUT_DIR is reused, so running it again makes a new broker certificate only.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR BROKER_NAME [MORE_NAMES_OR_IPS...]" >&2
  exit 2
fi
out=$1; shift
mkdir -p "$out"
umask 077

if [ ! -s "$out/ca.pem" ] || [ ! -s "$out/ca.key" ]; then
  # EC P-256 keys: small, fast on a Pi, accepted by rustls and Mosquitto.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 3650 -subj "/CN=printloop farm CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$out/ca.key" -out "$out/ca.pem" 2>/dev/null
fi

# The broker's names: every DNS name and IP address clients use to reach it.
san=""
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
san=${san%,}

openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj "/CN=$1" -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
  -days 825 -out "$out/server.crt" \
  -extfile <(printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n" "$san") 2>/dev/null
rm -f "$out/server.csr"
chmod 644 "$out/ca.pem" "$out/server.crt"
echo "CA: $out/ca.pem; broker certificate for $san: $out/server.crt, key $out/server.key"
