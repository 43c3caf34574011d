#!/usr/bin/env bash
# Submit a turnrl training run to a running Ray cluster as a Ray job.
#
#   deploy/submit.sh [options] [-- key=value ...]
#
# It runs, from the repository root:
#   ray job submit --address $RAY_ADDRESS --working-dir . [--runtime-env-json ...] [--no-wait] \
#       -- turnrl train --config $CONFIG [--run-dir DIR] key=value ...
# `turnrl train` is the same entry point as a local run; the config's `ray.address: auto` joins the
# job's cluster instead of starting Ray in-process.
#
# Options (environment variables in brackets):
#   --address URL        the head node's dashboard / Jobs API  [RAY_ADDRESS, default http://127.0.0.1:8265]
#   --config FILE        training config, relative to the repo  [CONFIG, default deploy/configs/cluster.yaml]
#   --run-dir DIR        run directory (use shared storage on a multi-node cluster)  [RUN_DIR]
#   --submission-id ID   job id (default: Ray picks one)  [SUBMISSION_ID]
#   --no-wait            return after submitting instead of following the logs
#   --env KEY=VALUE      environment variable for the driver and every actor (repeatable)
#   -h, --help           this text
# Ray token authentication: the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token;
# set RAY_AUTH_MODE=disabled for a cluster started without authentication.
# Everything after `--` is passed to `turnrl train` as dotted config overrides.
#
# Examples:
#   deploy/submit.sh                                            # demo task on the cluster
#   deploy/submit.sh --config deploy/configs/paper_triviaqa.yaml --run-dir /mnt/shared/runs/mt-grpo
#   deploy/submit.sh --no-wait -- learner.total_steps=10 algorithm.advantage=grpo_or
# Follow / stop a job:  ray job logs --address URL -f ID ;  ray job stop --address URL ID
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
config="${CONFIG:-deploy/configs/cluster.yaml}"
run_dir="${RUN_DIR:-}"
submission_id="${SUBMISSION_ID:-}"
no_wait=0
env_vars=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    --submission-id) submission_id="$2"; shift 2 ;;
    --no-wait) no_wait=1; shift ;;
    --env) env_vars+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "submit.sh: unknown option '$1' (overrides go after --; see --help)" >&2; exit 2 ;;
  esac
done

cd "$repo"
if [[ ! -f "$config" ]]; then
  echo "submit.sh: config '$config' not found (relative to $repo)" >&2
  exit 2
fi
ray_cli="${RAY_CLI:-ray}"
if ! command -v "$ray_cli" >/dev/null 2>&1; then
  echo "submit.sh: the 'ray' command is not on PATH (activate the environment that has ray[default])" >&2
  exit 2
fi

# Ray token authentication: a cluster started where ~/.ray/auth_token exists requires the token, but
# the job CLI only sends it in explicit token mode. Clusters without auth: RAY_AUTH_MODE=disabled.
if [[ -z "${RAY_AUTH_MODE:-}" && ( -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" || -f "$HOME/.ray/auth_token" ) ]]; then
  export RAY_AUTH_MODE=token
fi

# runtime env: what the working-dir upload leaves out, and the driver's / actors' environment
runtime_env="$("${PYTHON:-python3}" - "${env_vars[@]+"${env_vars[@]}"}" <<'PY'
import json, sys
env = {"TOKENIZERS_PARALLELISM": "false"}
for item in sys.argv[1:]:
    if "=" not in item:
        sys.exit(f"submit.sh: --env expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    env[key] = value
print(json.dumps({"excludes": ["/.git", "/.venv", "/runs", "/data", "__pycache__", ".pytest_cache"],
                  "env_vars": env}))
PY
)"

cmd=("$ray_cli" job submit --address "$address" --working-dir . --runtime-env-json "$runtime_env")
[[ -n "$submission_id" ]] && cmd+=(--submission-id "$submission_id")
[[ "$no_wait" == 1 ]] && cmd+=(--no-wait)
cmd+=(-- turnrl train --config "$config")
[[ -n "$run_dir" ]] && cmd+=(--run-dir "$run_dir")
cmd+=("$@")

echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
