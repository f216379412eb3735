#!/usr/bin/env bash
# Run the benchmark suite on a bare CUDA machine.
#   WHEELS=/path/to/wheels bash benchmarks/gpu.sh OUT_DIR
# Installs from the given wheel directory when WHEELS is set (machines without network),
# otherwise from the package index; then runs every benchmark on cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
python3 -m venv .gpu-venv
. .gpu-venv/bin/activate
if [ -n "${WHEELS:-}" ]; then
  pip install --no-index --find-links "$WHEELS" torch pyro-ppl tensorly tensorly-torch arviz \
    tqdm matplotlib
  pip install --no-index --find-links "$WHEELS" --no-deps -e .
else
  pip install -e ".[test]"
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python benchmarks/run.py --device cuda --out "$OUT"
