#!/usr/bin/env bash
# SGLFormer on one CUDA GPU, on one or both spikingjelly stacks: golden tests for every neuron, then
# the neuron and memory benchmark, in one table.
#
# NOT YET RUN: written on a machine without a GPU. Installs nothing. $PYTHON is an environment with the
# reference stack (torch with CUDA, timm, spikingjelly 0.0.0.0.14 and cupy-cuda12x or -cuda13x matching
# the CUDA runtime: pip install -r requirements.txt); $PYTHON_SJ2, if set, one with spikingjelly 2.x
# (pip install -r requirements-sj2.txt). Either may be left empty ('') to skip that stack. Each stage
# has a time limit; with both stacks the script stays under 8 minutes (460 s of limits).
#
# Per stack:
# 1. Golden tests on CUDA (tests/test_models.py::test_golden with SGLFORMER_TEST_DEVICE=cuda, TF32 off)
#    for spikingjelly's neurons as chosen automatically (CuPy with 0.0.0.0.14; spikingjelly 2's own
#    CUDA or Triton kernels), the fused neuron, and with 0.0.0.0.14 also its torch backend. Tolerance as
#    on the CPU: outputs and BatchNorm statistics 1e-5 relative to the goldens' largest value, gradients
#    1e-4. CuPy's kernels are compiled with -use_fast_math, whose sigmoid moves surrogate gradients by
#    about 1e-6 relative: inside the gradient tolerance.
# 2. Benchmarks, float16 autocast: spikingjelly's automatic neurons (baseline) against the fused ones,
#    and with spikingjelly 2 also its memopt (bit-packed checkpointing; optimize_memory level 1), on
#    CIFAR-10 4-384 (sglformer_cifar10, batch 64) and ImageNet sglformer_ima_8_512 (batch 32).
# spikingjelly 2 picks its CUDA LIF kernel once per process (native CUDA, then Triton, then Torch);
# SJ_LIF_CUDA_IMPLEMENTATION=cuda|triton|torch in the environment forces one.
#
# Usage: bench/gpu.sh     (PYTHON=..., PYTHON_SJ2=... choose the interpreters, RESULTS=... the JSON folder)
# Exit status: non-zero if a stage failed; later stages run anyway.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON-python}
PYTHON_SJ2=${PYTHON_SJ2-}
RESULTS=${RESULTS:-$(mktemp -d)}
mkdir -p "$RESULTS"
status=0

stage() {
    echo
    echo "== $1"
}

run_stack() {  # run_stack NAME INTERPRETER NEURONS
    local name=$1 python=$2 neurons=$3
    stage "$name: environment"
    timeout 15 "$python" - <<'EOF' || status=1
import spikingjelly, timm, torch
from sglformer.neuron import STACK, NeuronBackendError, choose_neuron
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, {STACK}, '
      f'{torch.cuda.get_device_name()}')
for implementation in ('spikingjelly', 'auto'):
    try:
        print(f'{implementation}: {choose_neuron(implementation, "auto", "cuda")}')
    except NeuronBackendError as exc:
        print(f'{implementation}: cannot run: {exc}')
EOF

    stage "$name: golden tests on CUDA"
    SGLFORMER_TEST_DEVICE=cuda timeout 75 "$python" -m pytest -q -p no:cacheprovider \
        tests/test_models.py -k test_golden -rA || status=1

    stage "$name: benchmark, CIFAR-10 4-384, batch 64, float16 autocast"
    timeout 65 "$python" -m sglformer.bench --model sglformer_cifar10 --batch 64 --device cuda --amp \
        --neuron "$neurons" --warmup 3 --repeat 8 --json "$RESULTS/$name-cifar10.json" || status=1

    stage "$name: benchmark, ImageNet sglformer_ima_8_512, batch 32, float16 autocast"
    timeout 75 "$python" -m sglformer.bench --model sglformer_ima_8_512 --batch 32 --device cuda --amp \
        --neuron "$neurons" --warmup 2 --repeat 4 --json "$RESULTS/$name-ima_8_512.json" || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ -n "$PYTHON" ]; then
    run_stack reference "$PYTHON" spikingjelly,fused
fi
if [ -n "$PYTHON_SJ2" ]; then
    run_stack sj2 "$PYTHON_SJ2" spikingjelly,fused,memopt-bit,memopt-auto
fi

stage "results (JSON in $RESULTS)"
shopt -s nullglob
reports=("$RESULTS"/*.json)
if [ ${#reports[@]} -gt 0 ]; then
    "${PYTHON:-$PYTHON_SJ2}" - "${reports[@]}" <<'EOF' || status=1
import json
import sys

from sglformer.bench import format_report

print(format_report([json.load(open(path)) for path in sys.argv[1:]]))
EOF
else
    echo 'no benchmark finished'
    status=1
fi
exit $status
