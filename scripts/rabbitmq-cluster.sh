#!/usr/bin/env bash
# A throw-away RabbitMQ (Debian bookworm: 3.10.x) cluster with the MQTT plugin, on loopback only,
# for tests and chaos runs: start N nodes, SIGKILL one, restart it, stop them all.
# Findings about how RabbitMQ's MQTT behaves under these failures: docs/notes-rabbitmq.md.
#
# Usage (run as root, like CI):
#   scripts/rabbitmq-cluster.sh install              # apt-get what is missing (idempotent)
#   scripts/rabbitmq-cluster.sh start   DIR N BASEPORT  # N = 2 or 3; wipes DIR's old node data
#   scripts/rabbitmq-cluster.sh kill    DIR I        # SIGKILL node I's Erlang VM (beam.smp)
#   scripts/rabbitmq-cluster.sh restart DIR I        # start node I again, wait until it rejoined
#   scripts/rabbitmq-cluster.sh stop    DIR          # stop all nodes (SIGTERM, then SIGKILL)
#   scripts/rabbitmq-cluster.sh status  DIR          # one line per node, then the cluster view
#
# stdout is for programs: `start`, `restart` and `status` print one line per node
#   node=pl1@localhost mqtt=BASEPORT+1 pid=<beam.smp pid>
# Everything else (progress, errors, log tails) goes to stderr. Exit code 0 = done, else failed.
#
# Ports, all on 127.0.0.1, for node I (1..N) and BASEPORT B (B+49 must be <= 65535):
#   MQTT      B+I        (the only port clients use)
#   AMQP      B+10+I
#   Erlang distribution  B+20+I
#   epmd      B+30       (one private epmd per cluster, not the system one on 4369)
#   CLI tools B+40..B+49 (rabbitmqctl's own distribution port range)
#
# MQTT credentials: anonymous MQTT connections are allowed (mqtt.allow_anonymous = true) and are
# mapped to the fixed user printloop / printloop (mqtt.default_user / mqtt.default_pass); the same
# user is created as the broker's default user (default_user / default_pass, administrator, vhost
# "/"), so a client that sends username printloop + password printloop is accepted too.
# Override with PRINTLOOP_RMQ_USER / PRINTLOOP_RMQ_PASS at `start`.
#
# Options (environment, read at `start`; saved in DIR/cluster.env for the other subcommands):
#   PRINTLOOP_RMQ_QUEUE_TYPE=classic|quorum  queue type of clean_session=false sessions
#       (mqtt.durable_queue_type; default classic, RabbitMQ's default). See docs/notes-rabbitmq.md:
#       classic = a session lives on ONE node and is unavailable while that node is down;
#       quorum  = replicated, survives one dead node of 3.
#   PRINTLOOP_RMQ_TIMEOUT                    seconds allowed: start 90, restart 150 (a restart can
#       stall ~100 s, see cmd_restart); stop waits min(this, 30) s for SIGTERM, then SIGKILLs.
#
# Layout of DIR (any path; created if missing):
#   DIR/.erlang.cookie        shared Erlang cookie (mode 0400; HOME=DIR for nodes and CLI tools)
#   DIR/cluster.env           N, BASEPORT, options: written by `start`, read by the others
#   DIR/nI/rabbitmq.conf      node I's config        DIR/nI/enabled_plugins  [rabbitmq_mqtt].
#   DIR/nI/mnesia/            node I's data (RABBITMQ_MNESIA_BASE), kept across kill/restart
#   DIR/nI/log/               node I's log (RABBITMQ_LOG_BASE): DIR/nI/log/plI@localhost.log
#   DIR/nI/console.log        stdout/stderr of the start script    DIR/nI/beam.pid  VM pid
#
# Gotchas handled here (details in docs/notes-rabbitmq.md):
#   - /usr/sbin/rabbitmq* are wrappers that `su rabbitmq` and cd to /var/lib/rabbitmq when run as
#     root, dropping our HOME (cookie) and paths: this script calls /usr/lib/rabbitmq/bin/* directly
#     and runs the nodes as root.
#   - /etc/rabbitmq/rabbitmq-env.conf would be sourced by every node: RABBITMQ_CONF_ENV_FILE points
#     at an empty per-node file instead.
#   - The node name is not on beam.smp's command line (3.10 starts distribution from Erlang), so
#     the VM is found by RABBITMQ_PID_FILE and, failing that, by RABBITMQ_NODENAME in
#     /proc/PID/environ.
set -euo pipefail

RMQ_BIN=/usr/lib/rabbitmq/bin
TIMEOUT="${PRINTLOOP_RMQ_TIMEOUT:-90}"

log() { echo "rabbitmq-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '6,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
# install: packages, and make sure the distro's own broker/epmd do not hold ports.
# ---------------------------------------------------------------------------------------------
cmd_install() {
  [ "$(id -u)" = 0 ] || die "install needs root (apt-get)"
  local need=() p
  for p in rabbitmq-server mosquitto-clients; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
  else
    log "rabbitmq-server and mosquitto-clients already installed"
  fi
  # The package's postinst may start the system broker (rabbit@<hostname>, port 5672/25672) and
  # epmd on 4369 where a service manager allows it (Docker-like images usually deny it through
  # /usr/sbin/policy-rc.d). Stop and disable both; errors are ignored, there may be no systemd.
  if command -v systemctl >/dev/null 2>&1; then
    timeout 30 systemctl disable --now rabbitmq-server.service >/dev/null 2>&1 || true
    timeout 30 systemctl disable --now epmd.socket epmd.service >/dev/null 2>&1 || true
  fi
  if [ -x /etc/init.d/rabbitmq-server ]; then
    timeout 60 /etc/init.d/rabbitmq-server stop >/dev/null 2>&1 || true
  fi
  # A system broker started without systemd runs as user rabbitmq: stop only that one.
  local pid
  for pid in $(pgrep -u rabbitmq -x beam.smp 2>/dev/null || true); do
    log "stopping system rabbitmq-server (pid $pid)"; kill -TERM "$pid" 2>/dev/null || true
  done
  # The default-port epmd (4369) refuses -kill while nodes are registered; ours use another port.
  if timeout 5 epmd -port 4369 -names >/dev/null 2>&1; then
    timeout 5 epmd -port 4369 -kill >/dev/null 2>&1 && log "stopped epmd on 4369" || true
  fi
  [ -x "$RMQ_BIN/rabbitmq-server" ] || die "$RMQ_BIN/rabbitmq-server missing after install"
  log "ok: $(dpkg-query -W -f='rabbitmq-server ${Version}' rabbitmq-server)," \
      "$(dpkg-query -W -f='mosquitto-clients ${Version}' mosquitto-clients)"
}

# ---------------------------------------------------------------------------------------------
# Per-node environment and helpers.
# ---------------------------------------------------------------------------------------------
node_name() { echo "pl$1@localhost"; }

load_cluster() { # DIR -> sets DIR N BASEPORT QUEUE_TYPE
  DIR="$(cd "$1" 2>/dev/null && pwd -P)" || die "no such directory: $1"
  [ -f "$DIR/cluster.env" ] || die "$DIR/cluster.env missing: run 'start' first"
  # shellcheck source=/dev/null
  . "$DIR/cluster.env"
}

check_index() { # I
  [[ "$1" =~ ^[1-9]$ ]] && [ "$1" -le "$N" ] || die "node index must be 1..$N, got '$1'"
}

# Exports everything node I's start script and rabbitmqctl need. Run inside a subshell.
node_env() {
  local i=$1 d="$DIR/n$1"
  export HOME="$DIR"                                   # cookie: $HOME/.erlang.cookie
  export RABBITMQ_NODENAME; RABBITMQ_NODENAME="$(node_name "$i")"
  export RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" # empty: ignore /etc/rabbitmq/rabbitmq-env.conf
  export RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" # absent on purpose
  export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
  export RABBITMQ_BASE="$d"                            # only read on Windows; set for clarity
  export RABBITMQ_MNESIA_BASE="$d/mnesia"
  export RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_PID_FILE="$d/beam.pid"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$((BASEPORT + 10 + i))
  export RABBITMQ_DIST_PORT=$((BASEPORT + 20 + i))
  export ERL_EPMD_PORT=$((BASEPORT + 30))
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_CTL_DIST_PORT_MIN=$((BASEPORT + 40))
  export RABBITMQ_CTL_DIST_PORT_MAX=$((BASEPORT + 49))
  # Distribution on loopback only; schedulers that do not busy-wait (2-core CI machines).
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

# rabbitmqctl against node I, bounded: ctl I SECONDS args...
ctl() {
  local i=$1 t=$2; shift 2
  ( node_env "$i"; timeout "$t" "$RMQ_BIN/rabbitmqctl" "$@" )
}

# The OS pid of node I's beam.smp, or nothing. The pid file is written by the VM itself at boot
# and left behind by SIGKILL, so it is only trusted when that pid's environment names node I.
beam_pid() {
  local i=$1 name pid f
  name="RABBITMQ_NODENAME=$(node_name "$i")"
  f="$DIR/n$i/beam.pid"
  if [ -s "$f" ]; then
    pid=$(tr -dc '0-9' <"$f")
    if [ -n "$pid" ] && is_node_beam "$pid" "$name"; then echo "$pid"; return 0; fi
  fi
  for pid in $(pgrep -x beam.smp 2>/dev/null || true); do
    if is_node_beam "$pid" "$name"; then echo "$pid"; return 0; fi
  done
  return 0
}
is_node_beam() { # PID "RABBITMQ_NODENAME=..." ; also checks HOME=DIR (same name, other cluster)
  local env
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = beam.smp ] || return 1
  env=$(tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null) || return 1
  grep -qxF "$2" <<<"$env" && grep -qxF "HOME=$DIR" <<<"$env"
}

now_ms() { echo $(( ${EPOCHREALTIME/./} / 1000 )); }
elapsed() { local ms=$(( $(now_ms) - $1 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

tail_logs() { # I
  local d="$DIR/n$1"
  log "---- last lines of $d/console.log and $d/log/*.log ----"
  tail -n 15 "$d/console.log" >&2 2>/dev/null || true
  tail -n 25 "$d/log/"*.log >&2 2>/dev/null || true
}

# Writes node I's config files. Called by `start` only (restart reuses them).
write_node_config() {
  local i=$1 d="$DIR/n$1" j
  mkdir -p "$d/mnesia" "$d/log"
  : >"$d/rabbitmq-env.conf"
  # Only the MQTT plugin (it pulls in its dependencies); no management plugin.
  echo '[rabbitmq_mqtt].' >"$d/enabled_plugins"
  {
    echo "# generated by scripts/rabbitmq-cluster.sh for $(node_name "$i")"
    echo "listeners.tcp.1 = 127.0.0.1:$((BASEPORT + 10 + i))"
    echo "mqtt.listeners.tcp.1 = 127.0.0.1:$((BASEPORT + i))"
    echo "mqtt.allow_anonymous = true"
    echo "mqtt.default_user = $RMQ_USER"
    echo "mqtt.default_pass = $RMQ_PASS"
    echo "mqtt.vhost = /"
    echo "mqtt.exchange = amq.topic"
    echo "mqtt.durable_queue_type = $QUEUE_TYPE"
    echo "# Broker default user, created when the cluster's database is new (node 1's first boot)."
    echo "default_user = $RMQ_USER"
    echo "default_pass = $RMQ_PASS"
    echo "default_user_tags.administrator = true"
    echo "loopback_users = none"
    echo "# Largest message accepted (bytes): 16 MiB, far above our 256 KiB payloads."
    echo "# RabbitMQ 3.10's MQTT plugin has no MQTT-specific frame limit of its own."
    echo "max_message_size = 16777216"
    # Cluster: at its first boot (empty mnesia dir) node I>1 joins node 1 (classic_config peer
    # discovery). Node 1 lists no peers, else it would retry the not-yet-started ones for 5 s
    # (10 x 500 ms) before starting alone. Later boots use the membership stored in mnesia.
    if [ "$i" -gt 1 ]; then
      echo "cluster_formation.peer_discovery_backend = classic_config"
      echo "cluster_formation.classic_config.nodes.1 = $(node_name 1)"
    fi
    echo "log.file.level = info"
    echo "log.console = false"
    echo "disk_free_limit.absolute = 50MB"
  } >"$d/rabbitmq.conf"
}

# Starts node I's VM in the background (own session, so our caller's signals do not reach it).
launch_node() {
  local i=$1 d="$DIR/n$1"
  rm -f "$d/beam.pid"
  ( node_env "$i"; cd "$d"; exec setsid "$RMQ_BIN/rabbitmq-server" >>"$d/console.log" 2>&1 </dev/null ) &
  echo $! >"$d/script.pid"
}

# Waits until node I's MQTT port accepts TCP connections, until epoch second DEADLINE.
wait_mqtt() {
  local i=$1 deadline=$2 port=$((BASEPORT + $1)) spid
  spid=$(cat "$DIR/n$i/script.pid" 2>/dev/null || true)
  while ! port_open "$port"; do
    if [ -n "$spid" ] && ! kill -0 "$spid" 2>/dev/null && [ -z "$(beam_pid "$i")" ]; then
      tail_logs "$i"; die "$(node_name "$i") exited during startup"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || { tail_logs "$i"; die "$(node_name "$i"): MQTT port $port not open within ${TIMEOUT}s"; }
    sleep 0.5
  done
}

# Running cluster members as node I sees them, space separated.
running_nodes() {
  ctl "$1" 20 -q eval 'rabbit_nodes:all_running().' 2>/dev/null | tr -d '[]' | tr ',' ' ' || true
}

# Waits until node I (just started) sees every node whose VM is alive as running, and the first
# other alive node sees node I: the node has rejoined the cluster.
wait_joined() {
  local i=$1 deadline=$2 j want seen other="" ok
  for j in $(seq 1 "$N"); do
    if [ "$j" != "$i" ] && [ -n "$(beam_pid "$j")" ]; then other=$j; break; fi
  done
  while :; do
    ok=1
    seen=" $(running_nodes "$i") "
    for j in $(seq 1 "$N"); do
      [ -n "$(beam_pid "$j")" ] || continue
      want=$(node_name "$j"); [[ "$seen" == *" $want "* ]] || { ok=0; break; }
    done
    if [ "$ok" = 1 ] && [ -n "$other" ]; then
      seen=" $(running_nodes "$other") "
      [[ "$seen" == *" $(node_name "$i") "* ]] || ok=0
    fi
    [ "$ok" = 1 ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || { tail_logs "$i"; die "$(node_name "$i") did not join the cluster within ${TIMEOUT}s (it sees:$seen)"; }
    sleep 1
  done
}

print_node() { # I
  local pid; pid=$(beam_pid "$1")
  echo "node=$(node_name "$1") mqtt=$((BASEPORT + $1)) pid=${pid:-none}"
}

# ---------------------------------------------------------------------------------------------
# Subcommands on a cluster directory.
# ---------------------------------------------------------------------------------------------
start_cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then log "start failed: killing the nodes started so far"; kill_all; fi
  exit "$rc"
}

cmd_start() {
  [ $# = 3 ] || usage
  local dir=$1 i deadline t0
  N=$2; BASEPORT=$3
  [[ "$N" =~ ^[23]$ ]] || die "N must be 2 or 3"
  [[ "$BASEPORT" =~ ^[0-9]+$ ]] && [ "$BASEPORT" -ge 1024 ] && [ $((BASEPORT + 49)) -le 65535 ] \
    || die "BASEPORT must be 1024..65486"
  [ -x "$RMQ_BIN/rabbitmq-server" ] || die "RabbitMQ not installed: run '$0 install'"
  QUEUE_TYPE="${PRINTLOOP_RMQ_QUEUE_TYPE:-classic}"
  [[ "$QUEUE_TYPE" =~ ^(classic|quorum)$ ]] || die "PRINTLOOP_RMQ_QUEUE_TYPE must be classic or quorum"
  RMQ_USER="${PRINTLOOP_RMQ_USER:-printloop}"; RMQ_PASS="${PRINTLOOP_RMQ_PASS:-printloop}"
  mkdir -p "$dir"; DIR="$(cd "$dir" && pwd -P)"

  # Refuse to wipe a cluster that still runs (any pl* VM with HOME=DIR).
  for i in 1 2 3; do
    [ -z "$(beam_pid "$i")" ] || die "$(node_name "$i") of $DIR still runs: '$0 stop $DIR' first"
  done
  for i in $(seq 1 "$N"); do
    local p
    for p in $((BASEPORT + i)) $((BASEPORT + 10 + i)) $((BASEPORT + 20 + i)); do
      ! port_open "$p" || die "port $p is already in use"
    done
  done

  t0=$(now_ms); deadline=$(( $(date +%s) + TIMEOUT ))
  # On any failure from here on, kill what was started: no half-started cluster is left behind.
  trap start_cleanup EXIT
  rm -rf "$DIR"/n[0-9] "$DIR/cluster.env"
  # Shared cookie: random, owner-only (Erlang refuses a cookie file readable by others).
  if [ ! -s "$DIR/.erlang.cookie" ]; then
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/.erlang.cookie")
  fi
  chmod 400 "$DIR/.erlang.cookie"
  cat >"$DIR/cluster.env" <<EOF
N=$N
BASEPORT=$BASEPORT
QUEUE_TYPE=$QUEUE_TYPE
RMQ_USER=$RMQ_USER
EOF
  for i in $(seq 1 "$N"); do write_node_config "$i"; done

  # Node 1 first: it forms the cluster (and creates the default user). Nodes 2..N then start
  # together; classic_config peer discovery makes each join node 1 at its first boot.
  log "starting $(node_name 1) (MQTT $((BASEPORT + 1)))"
  launch_node 1
  wait_mqtt 1 "$deadline"
  for i in $(seq 2 "$N"); do log "starting $(node_name "$i") (MQTT $((BASEPORT + i)))"; launch_node "$i"; done
  for i in $(seq 2 "$N"); do wait_mqtt "$i" "$deadline"; done
  for i in $(seq 2 "$N"); do wait_joined "$i" "$deadline"; done
  trap - EXIT
  log "cluster of $N up in $(elapsed "$t0") s"
  for i in $(seq 1 "$N"); do print_node "$i"; done
}

cmd_kill() {
  [ $# = 2 ] || usage
  load_cluster "$1"; check_index "$2"
  local i=$2 pid
  pid=$(beam_pid "$i")
  [ -n "$pid" ] || die "$(node_name "$i") is not running"
  kill -KILL "$pid"
  # Bounded wait for the process to be gone (the kernel closes its sockets at once).
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  ! kill -0 "$pid" 2>/dev/null || die "pid $pid survived SIGKILL for 5 s"
  log "killed $(node_name "$i") (beam.smp pid $pid)"
}

cmd_restart() {
  [ $# = 2 ] || usage
  load_cluster "$1"; check_index "$2"
  local i=$2 deadline t0 pid
  # Usually 5-8 s. But when the running nodes have no leader for the MQTT plugin's Raft cluster
  # (mqtt_node, the client-id tracker) - the leader's node died and no majority is left: in a
  # 2-node cluster, or when the leader's node and one more of 3 died - a restarting node blocks
  # ~100 s in the plugin's start (mqtt_node START_TIMEOUT = 100 s) before its MQTT port opens.
  # So restart allows 150 s unless PRINTLOOP_RMQ_TIMEOUT says otherwise.
  TIMEOUT="${PRINTLOOP_RMQ_TIMEOUT:-150}"
  pid=$(beam_pid "$i")
  [ -z "$pid" ] || die "$(node_name "$i") is still running (pid $pid): kill or stop it first"
  t0=$(now_ms); deadline=$(( $(date +%s) + TIMEOUT ))
  log "restarting $(node_name "$i") (MQTT $((BASEPORT + i)), waiting up to ${TIMEOUT}s; on timeout the node is left running: use kill)"
  launch_node "$i"
  wait_mqtt "$i" "$deadline"
  wait_joined "$i" "$deadline"
  log "$(node_name "$i") back in $(elapsed "$t0") s"
  print_node "$i"
}

# SIGKILL every node of DIR that runs, and the cluster's epmd (used when `start` fails).
kill_all() {
  local i pid
  for i in $(seq 1 "$N"); do
    pid=$(beam_pid "$i"); [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true
  done
  sleep 0.5
  timeout 5 epmd -port $((BASEPORT + 30)) -kill >/dev/null 2>&1 || true
}

cmd_stop() {
  [ $# = 1 ] || usage
  load_cluster "$1"
  local i pid pids=() alive grace
  grace=$((TIMEOUT < 30 ? TIMEOUT : 30))
  # SIGTERM makes RabbitMQ 3.10 shut down gracefully (its own signal handler); all at once.
  for i in $(seq 1 "$N"); do
    pid=$(beam_pid "$i")
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); fi
  done
  for _ in $(seq 1 $((grace * 10))); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then log "pid $pid ignored SIGTERM for ${grace}s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
  # The cluster's private epmd (started by the first node's VM) has no names left now.
  timeout 5 epmd -port $((BASEPORT + 30)) -kill >/dev/null 2>&1 || true
  log "stopped ${#pids[@]} node(s) of $DIR"
}

cmd_status() {
  [ $# = 1 ] || usage
  load_cluster "$1"
  local i pid first="" state
  for i in $(seq 1 "$N"); do
    pid=$(beam_pid "$i")
    if [ -z "$pid" ]; then state=down
    elif port_open $((BASEPORT + i)); then state=up; [ -n "$first" ] || first=$i
    else state=starting; fi
    echo "node=$(node_name "$i") mqtt=$((BASEPORT + i)) pid=${pid:-none} state=$state"
  done
  if [ -n "$first" ]; then
    echo "running_nodes(as seen by $(node_name "$first"))=$(running_nodes "$first" | tr -s ' ' | sed 's/^ //;s/ $//;s/ /,/g')"
  fi
}

case "${1:-}" in
  install) shift; cmd_install "$@" ;;
  start) shift; cmd_start "$@" ;;
  kill) shift; cmd_kill "$@" ;;
  restart) shift; cmd_restart "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  *) usage ;;
esac
