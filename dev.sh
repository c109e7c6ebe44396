#!/usr/bin/env bash
# One entry point for set-up and the everyday commands.
#   ./dev.sh demo    set up .venv if needed, then run the main job (`tf4ctr train`: synthetic
#                    Criteo-shaped data, 2 local workers)
#   ./dev.sh test    set up .venv if needed, then run the whole test-suite
#   ./dev.sh setup   only (re)create the environment
#   ./dev.sh bench   run the benchmark (benchmarks/)
#   ./dev.sh tf4ctr ARGS   any `tf4ctr` command inside the environment
# Set-up installs the CPU build of fbgemm unless an NVIDIA GPU is visible (or TF4CTR_DEVICE=gpu).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

device=${TF4CTR_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi

setup() {
  local stamp="$VENV/.tf4ctr-setup-$device"
  local want
  want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  echo "[setup] creating $VENV for $device (python: $($PY --version))"
  [ -d "$VENV" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "requirements/$device.txt" -r requirements/test.txt -r requirements/report.txt
  # torchrec declares the CUDA fbgemm-gpu as a dependency; its real needs are in common.txt.
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements/torchrec.txt
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, ray, pyarrow, s3fs; print('[setup] torch', torch.__version__, 'torchrec', torchrec.__version__, 'ray', ray.__version__)"
  # compile the CPU kernel now rather than in the first training step (eager ops, with a warning, if it cannot)
  "$VENV/bin/python" -m tf4ctr_dist.kernels
  echo "$want" > "$stamp"
}

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/tf4ctr" train "$@" ;;
  test)  setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  bench) setup; exec "$VENV/bin/python" -m benchmarks "$@" ;;
  tf4ctr) setup; exec "$VENV/bin/tf4ctr" "$@" ;;
  *) echo "usage: ./dev.sh [setup|demo|test|bench|tf4ctr] [args...]" >&2; exit 2 ;;
esac
