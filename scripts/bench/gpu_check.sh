#!/usr/bin/env bash
# Checks that need an NVIDIA GPU, in one go: the GPU tests, the headline training run, the flash
# benchmark and GPT-2 small's MFU. Each stage has its own time limit; a failing stage does not stop
# the others. Logs and run summaries go to OUTDIR (default gpu_check/).
#
#   bash scripts/bench/gpu_check.sh                        # every stage
#   bash scripts/bench/gpu_check.sh OUTDIR tests bench     # chosen stages: tests headline resume sample fp16 nano bench gpt2 compile profile
set -u
out=${1:-gpu_check}
shift || true
stages=${*:-tests headline resume sample fp16 nano bench gpt2 compile profile}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the stages run from the repository root
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - t0)) s"
}

summary() {  # summary RUN_DIR: one line of the run's summary.json
    python - "$1" <<'EOF'
import json, sys
from pathlib import Path
p = Path(sys.argv[1]) / "summary.json"
if not p.exists():
    print(f"SUMMARY {sys.argv[1]}: no summary.json"); sys.exit()
s = json.loads(p.read_text())
keys = ("status", "step", "final_val_loss", "tokens_per_sec", "mfu", "tflops", "peak_mem_bytes", "wall_time_s")
print(f"SUMMARY {Path(sys.argv[1]).name}: " + ", ".join(f"{k}={s.get(k)}" for k in keys))
EOF
}

has() { [[ " $stages " == *" $1 "* ]]; }

python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null

if has tests; then
    xdist=()
    python -c "import xdist" 2>/dev/null && xdist=(-n 8)
    stage tests 300 python -m pytest -q "${xdist[@]}" tests/test_flash_gpu.py tests/test_optim_gpu.py \
        tests/test_optim.py -k "gpu or fused" -p no:cacheprovider
fi

runs=$out/runs
if has headline; then  # the design's headline command, as a newcomer types it
    stage headline 240 python scripts/train.py attn=flash optim=adamw hydra.run.dir="$runs/headline"
    summary "$runs/headline"
fi

if has resume; then  # continue the headline run for 200 more steps from its last checkpoint
    stage resume 120 python scripts/train.py attn=flash optim=adamw max_iters=2200 resume=true \
        hydra.run.dir="$runs/headline"
    summary "$runs/headline"
fi

if has sample; then  # KV-cached sampling from the headline run, in its precision, with and without the cache
    stage sample-cached 60 python scripts/sample.py "$runs/headline" --num-tokens 500 --temperature 0 --stats
    stage sample-uncached 90 python scripts/sample.py "$runs/headline" --num-tokens 500 --temperature 0 --stats --no-cache
fi

if has fp16; then  # fp16 autocast with loss scaling, flash's fp16 kernels
    stage fp16 120 python scripts/train.py attn=flash precision=fp16 max_iters=500 eval_interval=250 \
        hydra.run.dir="$runs/fp16-flash"
    summary "$runs/fp16-flash"
fi

if has nano; then  # nano recipe, 500 steps: flash vs sdpa in fp32 and bf16
    for p in fp32 bf16; do
        for a in sdpa flash; do
            stage "nano-$a-$p" 90 python scripts/train.py attn=$a precision=$p max_iters=500 eval_interval=500 \
                hydra.run.dir="$runs/nano-$a-$p"
            summary "$runs/nano-$a-$p"
        done
    done
fi

if has bench; then
    stage bench-launch 90 python scripts/bench/bench_launch.py  # host vs GPU time per call at short T
    stage bench-tflops 240 env TRITON_PRINT_AUTOTUNING=1 python scripts/bench/bench_attention.py --tflops  # + each tuning
fi

if has gpt2; then  # GPT-2 small (124M, char vocabulary), bf16, 16 x 1024 tokens per step
    for a in flash sdpa; do
        stage "gpt2-$a" 150 python scripts/train.py model=gpt2 attn=$a precision=bf16 batch_size=16 max_iters=100 \
            warmup_iters=10 eval_interval=100 eval_iters=5 sample_tokens=0 log_interval=20 \
            hydra.run.dir="$runs/gpt2-$a"
        summary "$runs/gpt2-$a"
    done
fi

if has compile; then
    stage gpt2-flash-compiled 200 python scripts/train.py model=gpt2 attn=flash precision=bf16 batch_size=16 \
        max_iters=100 warmup_iters=10 eval_interval=100 eval_iters=5 sample_tokens=0 log_interval=20 compile=true \
        hydra.run.dir="$runs/gpt2-flash-compiled"
    summary "$runs/gpt2-flash-compiled"
fi

if has profile; then  # profile=true on CUDA: the trace, top_ops.txt and a memory snapshot
    stage profile 120 python scripts/train.py attn=flash precision=bf16 max_iters=20 eval_interval=0 sample_tokens=0 \
        profile=true hydra.run.dir="$runs/profile"
    ls -la "$runs/profile/profile" 2>&1 | head -20
    head -15 "$runs/profile/profile/top_ops.txt" 2>&1
fi
