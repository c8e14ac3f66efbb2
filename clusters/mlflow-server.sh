#!/usr/bin/env bash
# The shared MLflow tracking server every bt-ray job of a cluster tracks to (docs/operations-mlflow.md).
#
# Runs `mlflow server` in the foreground (a head-node command, a KubeRay sidecar or a Deployment keeps it
# alive) with runs, params and metrics in a database (PostgreSQL on clusters) and artifact proxying on:
# clients upload and download artifacts through the server's HTTP API, so no node needs bucket
# credentials or a shared mount for them; only the server reaches MLFLOW_ARTIFACTS_DESTINATION.
# Jobs find it through MLFLOW_TRACKING_URI=http://<host>:<port>.
#
# Environment:
#   MLFLOW_BACKEND_STORE_URI      required: SQLAlchemy URI of the store, e.g.
#                                 postgresql+psycopg://user:pw@host:5432/mlflow (psycopg 3, the `cluster`
#                                 extra; postgresql+psycopg2://... with psycopg2 installed also works)
#   MLFLOW_ARTIFACTS_DESTINATION  required: where the server keeps artifacts: s3://bucket/prefix on
#                                 clusters (AWS_* credentials or an instance role; the `cluster` extra
#                                 installs boto3), or a local directory
#   MLFLOW_HOST                   interface to bind (default 0.0.0.0: reachable from the other nodes)
#   MLFLOW_PORT                   port (default 5000)
#   MLFLOW_ALLOWED_HOSTS          optional: comma-separated Host headers the server accepts (MLflow's
#                                 default is localhost and private IPs; add a DNS name such as a
#                                 Kubernetes Service's, e.g. mlflow,mlflow.default.svc.cluster.local)
#   MLFLOW_WORKERS                optional: server worker processes (MLflow's default is 4)
# Extra arguments are passed on to `mlflow server` unchanged.
set -euo pipefail

missing=()
[[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]] || missing+=(
    "MLFLOW_BACKEND_STORE_URI (the store's SQLAlchemy URI, e.g. postgresql+psycopg://user:pw@host:5432/mlflow)")
[[ -n "${MLFLOW_ARTIFACTS_DESTINATION:-}" ]] || missing+=(
    "MLFLOW_ARTIFACTS_DESTINATION (where artifacts go: s3://bucket/prefix on clusters, or a local directory)")
if ((${#missing[@]})); then
    echo "mlflow-server.sh: required environment variable(s) not set:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 2
fi
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
if ! [[ "$port" =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
    echo "mlflow-server.sh: MLFLOW_PORT must be a port number in 1..65535; got '$port'" >&2
    exit 2
fi
if ! command -v mlflow >/dev/null; then
    echo "mlflow-server.sh: no 'mlflow' on PATH; activate the venv that installed bt-ray (pip install -e '.[cluster]')" >&2
    exit 2
fi

dest="$MLFLOW_ARTIFACTS_DESTINATION"
if [[ "$dest" != *://* ]]; then  # a local directory: absolute, and created, so the server can write to it
    mkdir -p "$dest"
    dest="$(cd "$dest" && pwd)"
fi

args=(--backend-store-uri "$MLFLOW_BACKEND_STORE_URI" --serve-artifacts --artifacts-destination "$dest"
      --host "$host" --port "$port")
[[ -z "${MLFLOW_ALLOWED_HOSTS:-}" ]] || args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
[[ -z "${MLFLOW_WORKERS:-}" ]] || args+=(--workers "$MLFLOW_WORKERS")

echo "mlflow-server.sh: store ${MLFLOW_BACKEND_STORE_URI%%://*}://..., artifacts $dest, on $host:$port" >&2
exec mlflow server "${args[@]}" "$@"
