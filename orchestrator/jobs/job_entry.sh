#!/bin/sh
# Entry point of a Ray job submitted by `llip submit` (runs on the head, in the job's working dir;
# `llip submit` inlines this file into the entrypoint as `sh -c SCRIPT llip-job ARGS`).
#
# A job's bare `python` is whatever the head's PATH says, often the system interpreter without our
# dependencies. The interpreter that certainly has them is the one running this cluster's Ray
# workers: the raylet, an ancestor of this shell, names it in its --python_worker_command argument
# (unresolved, so a venv stays a venv; the workers' own command lines are overwritten with
# "ray::..." titles). $LLIP_PYTHON, when set, wins; `python3`/`python` are the last resort.
#
# Usage: sh job_entry.sh run|sweep FILE.yaml [llip args...]
set -e

ok() { [ -n "$1" ] && "$1" -c "import ray, torch, mlflow" >/dev/null 2>&1; }

PY="${LLIP_PYTHON:-}"
if ! ok "$PY"; then
  PY=""
  pid=$$
  while [ -z "$PY" ] && [ "${pid:-1}" -gt 1 ] && [ -r "/proc/$pid/status" ]; do
    pid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status")
    [ -r "/proc/$pid/cmdline" ] || break
    cand=$(tr '\0' '\n' < "/proc/$pid/cmdline" | sed -n 's/^--python_worker_command=\([^ ]*\).*/\1/p' | head -n 1)
    if [ -n "$cand" ] && ok "$cand"; then PY="$cand"; fi
  done
fi
for cand in python3 python; do
  ok "$PY" && break
  PY=$(command -v "$cand" || true)
done
if ! ok "$PY"; then
  echo "llip job: no Python with ray, torch and mlflow found on this node; set LLIP_PYTHON" >&2
  exit 2
fi

# Results must outlive the job's working dir (Ray garbage-collects it): default MLflow store on the
# head is ~/llip/mlflow.db unless the submitter passed MLFLOW_TRACKING_URI.
mkdir -p "$HOME/llip"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$HOME/llip/mlflow.db}"
LIB=$("$PY" -c 'import os, orchestrator; print(os.path.dirname(os.path.dirname(orchestrator.__file__)))')
echo "[llip job] python: $PY   llip from: $LIB   MLflow: $MLFLOW_TRACKING_URI"
exec "$PY" -m orchestrator "$@"
