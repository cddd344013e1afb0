#!/usr/bin/env bash
# The checks that need a GPU, as one script: tests/test_cuda.py, then default-settings runs
# timed on the GPU beside the same machine's CPU. Run from the repository root on a machine
# with CUDA, torch, onnx and onnxruntime (the package itself comes from the checkout):
#
#     OUT=/tmp/gpu_check bash tools/gpu_check.sh
#
# Each step has its own time limit and logs to $OUT, so a slow step leaves the others' results.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, print its status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 4 "$OUT/$name.log"
}

{
    nvidia-smi -L
    $PY -c "import sys, torch, onnx, onnxruntime, numpy; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'onnx', onnx.__version__, 'onnxruntime',
onnxruntime.__version__, 'numpy', numpy.__version__)"
    nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step cuda_tests 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs

# The README's first command on the GPU and on this machine's CPU: default settings
# (fcpts + reconstruction, time-sized), MNIST at 80%, then the labelled accuracy.
for device in cuda cpu; do
    step "mnist_$device" 150 $PY -m fcpts_onnx optimize models/mnist_cnn/mnist_cnn.onnx --sparsity 0.8 \
        --calib models/mnist_cnn/calib.npz --device $device --quiet \
        -o "$WORK/mnist_$device.onnx" --report "$OUT/mnist_$device.json"
    $PY tools/mnist_eval.py "$WORK/mnist_$device.onnx" >>"$OUT/mnist_$device.log" 2>&1
    tail -n 1 "$OUT/mnist_$device.log"
done

# The ResNet-18 timing bar (224x224, 256 samples, default settings) with --device cuda.
step resnet18_cuda 240 $PY tools/time_resnet18.py --workdir "$WORK/r18" -- --device cuda --quiet
cp "$WORK/r18/resnet18.sparse.report.json" "$OUT/resnet18_cuda.json" 2>/dev/null

# Where a GPU step's time goes: the host-side profile of a short ResNet-18 run on the same
# model (60 steps), top functions by own time. Waits on the GPU show up as .item()/.cpu() calls.
step resnet18_profile 180 $PY -m cProfile -o "$OUT/resnet18_cuda.prof" -m fcpts_onnx optimize \
    "$WORK/r18/resnet18.onnx" --calib "$WORK/r18/calib256.npz" --sparsity 0.8 --iters 60 --device cuda \
    --quiet -o "$WORK/r18/profiled.onnx" --report "$OUT/resnet18_profile.json"
$PY -c "import pstats; pstats.Stats('$OUT/resnet18_cuda.prof').sort_stats('tottime').print_stats(35)" \
    >"$OUT/resnet18_profile.txt" 2>&1
# If graphs and streaming inputs learned on the GPU beside the CPU (silero-vad exports where
# SILERO_DIR holds them: tools/real_models.py caches them).
step control_flow 240 $PY tools/gpu_control_flow.py ${SILERO_DIR:+"$SILERO_DIR"/*.onnx}
rm -rf "$WORK"
