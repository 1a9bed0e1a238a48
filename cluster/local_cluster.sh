#!/usr/bin/env bash
# A local multi-node Ray cluster on one machine, with token authentication on: a head raylet and
# one or more worker raylets on 127.0.0.1, one CPU and one custom resource each (node_a on the
# head, node_b, node_c, ... on the workers), the dashboard (job submission endpoint) on 127.0.0.1.
# (Ray advertises the machine's own address for the nodes, and its GCS and raylets listen on every
# interface: the token is what keeps others out.)
#
#   cluster/local_cluster.sh start     # prints the addresses for `ray job submit`; writes them and
#                                      # the token to $POPTRAIN_CLUSTER_DIR/env (`source` it)
#   cluster/local_cluster.sh status    # what this script's cluster runs
#   cluster/local_cluster.sh stop      # tears this cluster down (its processes only)
#
# Settings (environment variables):
#   POPTRAIN_CLUSTER_DIR   state folder: Ray's temp dir, logs, the env file  (default /tmp/poptrain-cluster)
#                          keep it short: Ray puts Unix sockets under it (107-byte path limit)
#   WORKERS                worker raylets besides the head                  (default 1)
#   CPUS_PER_NODE          CPUs each node offers                              (default 1)
#   OBJECT_STORE_MB        object store per node, MiB                         (default 256)
#   RAY_AUTH_TOKEN         the cluster's token; default: `ray get-auth-token --generate`
#                          (~/.ray/auth_token, created when missing)
#   GCS_PORT, DASHBOARD_PORT   fixed ports instead of free ones picked at start
#   PYTHON                 the interpreter whose `ray` to use                 (default python3)
#
# `stop` does what `ray stop --force` does (SIGKILL), but only to the processes of this cluster:
# every process started under this cluster's sessions, or carrying its marker environment
# variable (job drivers, workers). `ray stop --force` would also kill every other Ray on the
# machine, including other users' local runs.
set -euo pipefail

STATE=${POPTRAIN_CLUSTER_DIR:-/tmp/poptrain-cluster}
PYTHON=${PYTHON:-python3}
RAY=("$PYTHON" -m ray.scripts.scripts)
MARKER=POPTRAIN_LOCAL_CLUSTER

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

free_ports() {  # free_ports N: N distinct free TCP ports on 127.0.0.1
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# PIDs of this cluster's processes: the sessions started by `start`, plus any process whose
# environment carries the marker (Ray starts job drivers in sessions of their own).
cluster_pids() {
    local sids="" pid sid
    [[ -f "$STATE/sids" ]] && sids=$(tr '\n' ' ' <"$STATE/sids")
    {
        if [[ -n "$sids" ]]; then
            while read -r pid sid; do
                for s in $sids; do [[ "$sid" == "$s" ]] && echo "$pid"; done
            done < <(ps -eo pid=,sid=)
        fi
        grep -lzx "$MARKER=$STATE" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
    } | { grep -vx "$$" || true; } | sort -un
}

start_node() {  # start_node LOG ARGS...: `ray start` in a session of its own; records the session id
    local log=$1; shift
    # In the new session, bash records its pid (the session id) and becomes `ray start`. The
    # marker goes to the node's processes only, not to this script's children (which would then
    # find themselves in cluster_pids).
    # shellcheck disable=SC2016
    if ! env "$MARKER=$STATE" setsid --wait bash -c 'echo $$ >>"$0"; exec "$@"' "$STATE/sids" \
            "${RAY[@]}" start "$@" >"$log" 2>&1; then
        cat "$log" >&2
        return 1
    fi
}

cmd_start() {
    if [[ -f "$STATE/env" ]] && [[ -n "$(cluster_pids)" ]]; then
        die "a cluster is already running from $STATE (run: $0 stop)"
    fi
    rm -rf "$STATE"
    mkdir -p "$STATE/ray" "$STATE/logs"
    chmod 700 "$STATE"

    local workers=${WORKERS:-1} cpus=${CPUS_PER_NODE:-1} store=$(( ${OBJECT_STORE_MB:-256} * 1024 * 1024 ))
    local token=${RAY_AUTH_TOKEN:-}
    if [[ -z "$token" ]]; then
        token=$("${RAY[@]}" get-auth-token --generate)
    fi
    [[ -n "$token" ]] || die "no authentication token"

    # Fixed-default ports (6379, 8265, 10001, 52365, ...) would collide with other Rays on the
    # machine: take free ones. Per node: node manager, object manager, agent http/grpc,
    # runtime-env agent, metrics; the head also: gcs, dashboard, client server.
    local ports
    read -r -a ports <<<"$(free_ports $(( 3 + 6 * (workers + 1) )))"
    local gcs=${GCS_PORT:-${ports[0]}} dash=${DASHBOARD_PORT:-${ports[1]}} client=${ports[2]}
    node_ports() {  # node_ports I: the flags of node I's own ports
        local b=$(( 3 + 6 * $1 ))
        echo "--node-manager-port ${ports[b]} --object-manager-port ${ports[b+1]}" \
             "--dashboard-agent-listen-port ${ports[b+2]} --dashboard-agent-grpc-port ${ports[b+3]}" \
             "--runtime-env-agent-port ${ports[b+4]} --metrics-export-port ${ports[b+5]}"
    }

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$token"
    export RAY_USAGE_STATS_ENABLED=0
    : >"$STATE/sids"

    # shellcheck disable=SC2046
    start_node "$STATE/logs/head.log" --head \
        --node-ip-address 127.0.0.1 --port "$gcs" \
        --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
        --ray-client-server-port "$client" \
        --num-cpus "$cpus" --num-gpus 0 --resources '{"node_a": 1}' \
        --object-store-memory "$store" --temp-dir "$STATE/ray" --disable-usage-stats \
        $(node_ports 0) || { cmd_stop >/dev/null; die "the head did not start (log above)"; }

    local i names=(b c d e f g h i j k l m n o p q r s t u v w x y z)
    for (( i = 1; i <= workers; i++ )); do
        # shellcheck disable=SC2046
        start_node "$STATE/logs/worker$i.log" \
            --address "127.0.0.1:$gcs" --node-ip-address 127.0.0.1 \
            --num-cpus "$cpus" --num-gpus 0 --resources "{\"node_${names[i-1]}\": 1}" \
            --object-store-memory "$store" --temp-dir "$STATE/ray" \
            --include-log-monitor false \
            $(node_ports "$i") || { cmd_stop >/dev/null; die "worker $i did not start (log above)"; }
    done

    # Wait until the GCS lists every node alive, so a job submitted next sees the whole cluster.
    "$PYTHON" - "127.0.0.1:$gcs" $(( workers + 1 )) <<'EOF' || { cmd_stop >/dev/null; die "the nodes did not all register"; }
import sys, time
import ray._raylet
client = ray._raylet.GcsClient(address=sys.argv[1])
deadline = time.monotonic() + 60
while True:
    alive = [n for n in client.get_all_node_info().values() if n.state == 0]  # 0: ALIVE
    if len(alive) >= int(sys.argv[2]):
        break
    if time.monotonic() > deadline:
        sys.exit(f"only {len(alive)} of {sys.argv[2]} nodes registered")
    time.sleep(0.2)
EOF

    umask 077
    # RAY_API_SERVER_ADDRESS: where `ray job ...` goes (the dashboard); RAY_ADDRESS: where a driver
    # (`ray.init()`, `poptrain run` started by hand, `ray status`) joins (the GCS).
    cat >"$STATE/env" <<EOF
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash
export RAY_ADDRESS=127.0.0.1:$gcs
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=$token
EOF
    echo "127.0.0.1:$gcs" >"$STATE/gcs_address"
    cat <<EOF
local Ray cluster up: head + $workers worker raylet(s) on 127.0.0.1, $cpus CPU(s) each, token auth on
  GCS (ray start --address / ray.init):  127.0.0.1:$gcs
  dashboard / job submission:            http://127.0.0.1:$dash
  state, logs:                           $STATE
Submit to it (the address and token are in $STATE/env, readable by you only):
  source $STATE/env
  ray job submit --working-dir . -- poptrain run configs/prelu_separation.yaml placement.strategy=SPREAD
or, with the token already in your environment (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN):
  ray job submit --address http://127.0.0.1:$dash --working-dir . -- poptrain run configs/prelu_separation.yaml
Stop it with: $0 stop
EOF
}

cmd_stop() {
    local pids
    pids=$(cluster_pids)
    if [[ -z "$pids" ]]; then
        echo "no process of the cluster in $STATE is running"
    else
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        local deadline=$(( SECONDS + 10 ))
        while [[ -n "$(cluster_pids)" ]] && (( SECONDS < deadline )); do sleep 0.2; done
        [[ -z "$(cluster_pids)" ]] || die "processes still running: $(cluster_pids | tr '\n' ' ')"
        echo "stopped the cluster in $STATE ($(echo "$pids" | wc -l) processes)"
    fi
    rm -rf "$STATE/ray"  # sockets and session files; logs stay in $STATE/logs
    rm -f "$STATE/env" "$STATE/gcs_address"
}

cmd_status() {
    local pids
    pids=$(cluster_pids)
    if [[ -z "$pids" ]]; then
        echo "not running ($STATE)"
        return 3
    fi
    [[ -f "$STATE/env" ]] && grep -E 'RAY_(API_SERVER_)?ADDRESS' "$STATE/env" | sed 's/^export //'
    # shellcheck disable=SC2086
    ps -o pid=,args= -p "$(echo $pids | tr ' ' ,)" | cut -c1-150
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status   (see the header of this file for settings)" >&2; exit 2 ;;
esac
