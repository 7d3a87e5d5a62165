#!/usr/bin/env bash
# The GPU bench in one go: training throughput (float32, bf16, torch.compile) and the
# README's main job in float32 and bf16, each step under its own time limit so that one
# slow step cannot take the others' time.
#
#   bash bench/gpu_bench.sh [OUT_DIR] [SCALE]     # OUT_DIR default results/gpu_bench
#
# SCALE (default 1) multiplies every step's time limit. OUT_DIR must be new or empty (a
# non-empty one is refused, exit 2). Each step's output is kept in OUT_DIR/<step>.log and
# the README jobs' results JSON in OUT_DIR; docs/benchmarks.md ("GPU") gives the figures
# of one run and the machine it ran on.
set -u
out=${1:-results/gpu_bench}
scale=${2:-1}
if [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "gpu_bench.sh: error: $out is not empty; choose another OUT_DIR" >&2
    exit 2
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$(( $2 * scale )); shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $(( SECONDS - start ))s"
}

{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nproc; } 2>&1 | tee "$out/machine.log"

# The README job, float32 then bf16 (fresh synthface, own checkpoint folder per run).
for amp in off bf16; do
    step "readme_amp_$amp" 150 python3 opqn_main.py --dataset synthface --len 36 --num 6 \
        --words 64 --amp "$amp" --data-dir "$work/data" --checkpoint-dir "$work/ckpt_$amp" \
        --log-dir "$work/log_$amp" --out "$work/results_$amp" --no-progress
    cp "$work"/results_"$amp"/*.json "$out/readme_amp_$amp.json" 2>/dev/null
done

# One training step, float32 against bf16 + channels_last: the three-row table.
step train_table 60 python3 -m bench.bench_train --device cuda
# 112x112, batch 256: bare step and the real loop (PNG files, uint8 cache).
step train_112 90 python3 -m bench.bench_train --input-size 112 --device cuda --batch 256 \
    --workers 8
# The same bare step under torch.compile.
step train_112_compile 130 python3 -m bench.bench_train --input-size 112 --device cuda \
    --batch 256 --workers 8 --compile
