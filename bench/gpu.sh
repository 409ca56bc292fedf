#!/usr/bin/env bash
# SGLFormer on one CUDA GPU: golden tests for every neuron, then the neuron benchmark, in one table.
#
# NOT YET RUN: written on a machine without a GPU. Installs nothing: it needs torch (CUDA build),
# timm, spikingjelly and cupy (cupy-cuda12x or -cuda13x, matching the CUDA runtime) in the Python
# environment of $PYTHON, and this repository installed or on the path. Each stage has a time limit;
# the whole script stays under 8 minutes.
#
# 1. Golden tests on CUDA (tests/test_models.py::test_golden with SGLFORMER_TEST_DEVICE=cuda, TF32
#    off) for spikingjelly's torch backend, its CuPy backend and the fused neuron. Tolerance, the
#    same for all three and the same as on the CPU: outputs and BatchNorm statistics 1e-5 relative to
#    the goldens' largest value, gradients 1e-4. CuPy's kernels are compiled with -use_fast_math,
#    whose sigmoid moves surrogate gradients by about 1e-6 relative: inside the gradient tolerance.
# 2. Benchmarks, float16 autocast, CuPy neurons (baseline) against fused ones: CIFAR-10 4-384
#    (sglformer_cifar10, batch 64) and ImageNet sglformer_ima_8_512 (batch 32).
#
# Usage: bench/gpu.sh            (PYTHON=... to choose the interpreter, RESULTS=... for the JSON files)
# Exit status: non-zero if a stage failed; later stages run anyway.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS=${RESULTS:-$(mktemp -d)}
mkdir -p "$RESULTS"
status=0

stage() {
    echo
    echo "== $1"
}

stage 'environment'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PYTHON" - <<'EOF' || status=1
import spikingjelly, timm, torch
from sglformer.neuron import cupy_status
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, '
      f'{torch.cuda.get_device_name()}')
usable, reason = cupy_status()
print(f"CuPy neurons: {'usable' if usable else 'NOT usable'} ({reason})")
EOF

stage 'golden tests on CUDA: spikingjelly torch backend, spikingjelly cupy backend, fused'
SGLFORMER_TEST_DEVICE=cuda timeout 200 "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_models.py -k test_golden -rA || status=1

stage 'benchmark: CIFAR-10 4-384, batch 64, float16 autocast'
timeout 120 "$PYTHON" -m sglformer.bench --model sglformer_cifar10 --batch 64 --device cuda --amp \
    --neuron cupy,fused --warmup 3 --repeat 10 --json "$RESULTS/cifar10.json" || status=1

stage 'benchmark: ImageNet sglformer_ima_8_512, batch 32, float16 autocast'
timeout 150 "$PYTHON" -m sglformer.bench --model sglformer_ima_8_512 --batch 32 --device cuda --amp \
    --neuron cupy,fused --warmup 2 --repeat 5 --json "$RESULTS/ima_8_512.json" || status=1

stage "results (JSON in $RESULTS)"
"$PYTHON" - "$RESULTS"/*.json <<'EOF' || status=1
import json
import sys

from sglformer.bench import format_report

print(format_report([json.load(open(path)) for path in sys.argv[1:]]))
EOF
exit $status
