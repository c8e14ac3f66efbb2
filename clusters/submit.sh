#!/usr/bin/env bash
# ray job submit from this checkout, passing the checkout's git sha to the job.
# The upload excludes .git (and .venv, caches, outputs: Ray caps a working dir at 100 MiB), so the job
# cannot ask git; bt_ray.config.git_sha reads BT_RAY_GIT_SHA instead ("<sha>+dirty" if tracked files
# differ from HEAD). Ray's own options go before the "--", the job's command after it:
#   clusters/submit.sh --address http://<head>:8265 -- python jobs/sft.py --config jobs/configs/sft_llama3_8b.yaml
# RAY overrides the ray executable (default: ray on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
sha="$(git rev-parse HEAD)"
git diff --quiet HEAD -- || sha="$sha+dirty"
excludes='".venv", ".git", ".cache", "outputs", ".pytest_cache", ".ruff_cache", "**/__pycache__"'
runtime_env="{\"excludes\": [$excludes], \"env_vars\": {\"BT_RAY_GIT_SHA\": \"$sha\"}}"
exec "${RAY:-ray}" job submit --working-dir . --runtime-env-json "$runtime_env" "$@"
