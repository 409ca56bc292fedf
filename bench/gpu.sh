#!/usr/bin/env bash
# SGLFormer on one CUDA GPU, verified in one call (under 8 minutes), on both spikingjelly stacks:
#   1. the golden tests on CUDA (TF32 off) for every neuron kernel of each stack;
#   2. a float16-autocast training step per kernel (finite loss; fused units and recomputing units against
#      spikingjelly's neurons) and the benchmark of CIFAR-10 4-384 (batch 64) and ImageNet 8-512 (batch 32):
#      images/s and peak memory;
#   3. a one-process NCCL run of the ImageNet script on a tiny ImageFolder.
# It writes $RESULTS/gpu.json and $RESULTS/gpu.md (RESULTS: default $OUT, else a new temporary folder).
#
# The machine needs python3 with torch (CUDA), timm, pytest, CuPy and Triton, and no network: spikingjelly
# travels as wheels. `make gpu-wheels` (here, with network) puts them in .whl/; they are installed into
# temporary folders, one per stack, with a wheel of this checkout built on the spot. The golden tests run
# where the reference tensors are present (SGLFORMER_SHARED names their folder), and are skipped elsewhere.
#
# bash bench/gpu.sh --dry-run: every stage on the CPU at tiny sizes (the test suite runs it), with the
# stacks whose wheels are in $WHEELS (default .whl/), or else the installed one.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=$([ "${1-}" = --dry-run ] && echo 1 || echo 0)
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
RESULTS=${RESULTS:-${OUT:-$(mktemp -d)}}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"
status=0
if [ "$DRY" = 1 ]; then
    DEVICE=cpu; AMP=(--amp); SIZE=(--dim 48 --num-heads 4 -T 1 --batch 2 --repeat 1 --warmup 0)
    IMAGENET=(--dim 48 --num-heads 4 --layer 3 -T 1 --img-size 32 --batch 2 --repeat 1 --warmup 0); LIMIT=120
else
    DEVICE=cuda; AMP=(--amp); SIZE=(--batch 64 --repeat 5 --warmup 2); IMAGENET=(--batch 32 --repeat 3 --warmup 2); LIMIT=150
fi

stage() { echo; echo "== $*"; }
run() {  # run NAME SECONDS COMMAND...: one stage, its status kept in $WORK/status
    local name=$1 seconds=$2; shift 2
    timeout "$seconds" "$@"
    local code=$?
    echo "$name $code" >> "$WORK/status"
    [ $code = 0 ] || status=1
}

stage "this checkout as a wheel"
run wheel 120 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" . >/dev/null

stacks=()
for stack in reference sj2; do
    pattern=$([ $stack = reference ] && echo 'spikingjelly-0.0.0.0.14-*.whl' || echo 'spikingjelly-2.*.whl')
    wheels=$(ls "$WHEELS"/$pattern 2>/dev/null | head -1)
    target="$WORK/$stack"
    if [ -n "$wheels" ]; then
        [ $stack = sj2 ] && wheels="$wheels $(ls "$WHEELS"/loguru-*.whl 2>/dev/null)"
    elif "$PYTHON" -c "import spikingjelly.activation_based, sys; from importlib.metadata import version; \
sys.exit(version('spikingjelly').startswith('0.') != ('$stack' == 'reference'))" 2>/dev/null; then
        wheels=''  # the installed spikingjelly is this stack
    else
        echo "no spikingjelly wheel for the $stack stack in $WHEELS (make gpu-wheels) and none installed: skipped"
        continue
    fi
    run "install-$stack" 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$target" \
        "$WORK"/dist/*.whl $wheels >/dev/null
    stacks+=("$stack")
done

for stack in "${stacks[@]}"; do
    export PYTHONPATH="$WORK/$stack" SGLFORMER_TEST_DEVICE=$DEVICE CUPY_CACHE_DIR="$WORK/cupy"
    stage "$stack: goldens on $DEVICE, every neuron kernel"
    kernels=(default)
    if [ $stack = sj2 ] && [ "$DRY" = 0 ]; then kernels=(default cuda triton torch); fi
    for kernel in "${kernels[@]}"; do
        implementation=$([ "$kernel" = default ] && echo auto || echo "$kernel")
        SJ_LIF_CUDA_IMPLEMENTATION=$implementation run "goldens-$stack-$kernel" "$LIMIT" "$PYTHON" -m pytest -q \
            -p no:cacheprovider tests/test_models.py -k golden --junitxml "$RESULTS/goldens-$stack-$kernel.xml"
    done
    variants=spikingjelly,spikingjelly:recompute,fused
    if [ "$DEVICE" = cuda ]; then
        variants=$([ $stack = reference ] && echo spikingjelly,cupy:recompute,torch,fused || echo spikingjelly,spikingjelly:recompute,fused)
    fi
    stage "$stack: float16 autocast, CIFAR-10 4-384"
    run "bench-$stack-cifar10" "$LIMIT" "$PYTHON" -m sglformer.bench --model sglformer_cifar10 --device $DEVICE \
        "${AMP[@]}" "${SIZE[@]}" --neuron "$variants" --json "$RESULTS/bench-$stack-cifar10.json"
    stage "$stack: float16 autocast, ImageNet 8-512"
    run "bench-$stack-imagenet" "$LIMIT" "$PYTHON" -m sglformer.bench --model sglformer_ima_8_512 --device $DEVICE \
        "${AMP[@]}" "${IMAGENET[@]}" --neuron "$variants" --project-batch 32 --json "$RESULTS/bench-$stack-imagenet.json"
done

stage "one process of the ImageNet script under torchrun ($([ "$DEVICE" = cuda ] && echo NCCL || echo gloo))"
if [ ${#stacks[@]} -gt 0 ]; then
    export PYTHONPATH="$WORK/${stacks[0]}"
    "$PYTHON" -c "import sys; from sglformer.testing import write_image_folder; \
write_image_folder(sys.argv[1], ('n1', 'n2'), {'train': 8, 'val': 4})" "$WORK/imagenet"
    run torchrun 120 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 imagenet/train.py \
        --data_path "$WORK/imagenet" --model sglformer_ima_8_384 --dim 48 --num-heads 4 --layer 3 -T 1 --input_size 32 \
        --nb_classes 2 --num_workers 0 --batch_size 4 --epochs 1 --warmup_epochs 0 --device $DEVICE \
        --output_dir "$WORK/run" $([ "$DEVICE" = cpu ] && echo --amp)
fi

stage "results in $RESULTS"
"$PYTHON" - "$RESULTS" "$WORK/status" <<'EOF' || status=1
import json, pathlib, sys
from sglformer.bench import format_report

results, statuses = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text().split('\n')
stages = dict(line.split() for line in statuses if line)
reports = [json.loads(path.read_text()) for path in sorted(results.glob('bench-*.json'))]
(results / 'gpu.json').write_text(json.dumps({'stages': stages, 'benchmarks': reports}, indent=1))
table = ['| stage | result |', '| --- | --- |'] + [f"| {name} | {'passed' if code == '0' else f'failed ({code})'} |"
                                              for name, code in stages.items()]
(results / 'gpu.md').write_text('\n'.join(table) + '\n\n' + (format_report(reports) if reports else '') + '\n')
print((results / 'gpu.md').read_text())
EOF
exit $status
