#!/usr/bin/env bash
# The MLflow server of a cluster's head node, with a store that outlives the head.
# cluster.yaml runs it at every `ray up` (a new head, or an update of a running one).
#
# Backend store, in this order:
#   ANCRA_MLFLOW_BACKEND       a database URI, e.g. postgresql://USER:PASSWORD@HOST:5432/mlflow: the
#                              durable choice (a managed database, or one on a persistent volume)
#   ANCRA_MLFLOW_BACKEND_SSM   the name of an AWS SSM SecureString parameter holding that URI (keeps
#                              the password out of cluster.yaml; the head's role needs ssm:GetParameter)
#   otherwise                  sqlite on the head's disk (ANCRA_MLFLOW_DB, default ~/mlflow.db),
#                              restored at start from ANCRA_MLFLOW_SNAPSHOT (a path or s3:// URI) when
#                              the head has no store yet, and snapshotted there every
#                              ANCRA_MLFLOW_SNAPSHOT_EVERY_S seconds (default 300) and once more
#                              when the head goes down (SIGTERM)
# Artifacts: ANCRA_MLFLOW_ARTIFACTS (required; the bucket, e.g. s3://BUCKET/ancra-tune/mlflow).
# Where it listens: ANCRA_MLFLOW_HOST (default: the head's private address), ANCRA_MLFLOW_PORT (5000).
# Its processes are remembered in ANCRA_MLFLOW_STATE (default ~/.ancra-mlflow) and only they are
# stopped when it runs again. `mlflow_head.sh stop` stops them (the snapshot loop takes a last copy).
set -euo pipefail

STATE="${ANCRA_MLFLOW_STATE:-$HOME/.ancra-mlflow}"
DB="${ANCRA_MLFLOW_DB:-$HOME/mlflow.db}"
EVERY="${ANCRA_MLFLOW_SNAPSHOT_EVERY_S:-300}"
mkdir -p "$STATE"

stop() {  # stop a process this script started before, and wait for it (a snapshot loop's last copy)
    local pidfile="$STATE/$1.pid"
    [ -f "$pidfile" ] || return 0
    local pid
    pid="$(cat "$pidfile")"
    # Each runs in a session of its own: the whole group goes (mlflow server's uvicorn child too).
    if kill -TERM -- "-$pid" 2>/dev/null; then
        for _ in $(seq 1 120); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}
stop snapshot
stop server
if [ "${1:-start}" = "stop" ]; then
    exit 0
fi

: "${ANCRA_MLFLOW_ARTIFACTS:?set ANCRA_MLFLOW_ARTIFACTS to the bucket for MLflow artifacts}"
HOST="${ANCRA_MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}"
PORT="${ANCRA_MLFLOW_PORT:-5000}"

BACKEND="${ANCRA_MLFLOW_BACKEND:-}"
if [ -z "$BACKEND" ] && [ -n "${ANCRA_MLFLOW_BACKEND_SSM:-}" ]; then
    BACKEND="$(aws ssm get-parameter --with-decryption --name "$ANCRA_MLFLOW_BACKEND_SSM" \
               --query Parameter.Value --output text)"
fi
SQLITE=""
if [ -z "$BACKEND" ]; then
    BACKEND="sqlite:///$DB"
    SQLITE=1
    : "${ANCRA_MLFLOW_SNAPSHOT:?with the sqlite store, set ANCRA_MLFLOW_SNAPSHOT (where its snapshots go)}"
    # A new head (spot reclaim, ray down + up) starts from the newest snapshot; a head that kept its
    # disk keeps its store, which is newer than any snapshot of it.
    ancra-tune store restore --from "$ANCRA_MLFLOW_SNAPSHOT" --tracking-uri "$BACKEND"
fi

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
    setsid nohup mlflow server --host "$HOST" --port "$PORT" --workers 1 --backend-store-uri "$BACKEND" \
    --artifacts-destination "$ANCRA_MLFLOW_ARTIFACTS" > "$STATE/server.log" 2>&1 &
echo $! > "$STATE/server.pid"

if [ -n "$SQLITE" ]; then
    setsid nohup ancra-tune store snapshot --every "$EVERY" --to "$ANCRA_MLFLOW_SNAPSHOT" --tracking-uri "$BACKEND" \
        > "$STATE/snapshot.log" 2>&1 &
    echo $! > "$STATE/snapshot.pid"
fi
if [ -n "$SQLITE" ]; then
    echo "MLflow on http://$HOST:$PORT (store: sqlite $DB, snapshots to $ANCRA_MLFLOW_SNAPSHOT every $EVERY s)"
else
    echo "MLflow on http://$HOST:$PORT (store: the database backend)"
fi
