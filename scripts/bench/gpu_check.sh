#!/usr/bin/env bash
# Every GPU measurement of issue 22 in one call, sized for <= 8 minutes on one H100-class GPU:
#   env       versions, GPU name                                   -> OUTDIR/env.json
#   tests     the GPU tests of flash's compiled and eager paths (the 73-config sweep is left out)
#   overhead  eager flash host overhead per fwd+bwd vs sdpa-flash  -> OUTDIR/overhead.json, host_python.txt
#   gpt2      GPT-2 small bf16 16x1024, flash vs sdpa, eager and compiled, alternated rounds -> OUTDIR/gpt2.jsonl
#   long      the same at T=4096 (batch 4)                          -> OUTDIR/gpt2.jsonl
#   recipe    nanoGPT's shakespeare_char: flash and sdpa seed 1337, sdpa seed 1338, run concurrently
#             (a 10.7M model leaves most of the GPU idle)           -> OUTDIR/runs/recipe-*
#   others    naive and online at T=1024, eager and compiled        -> OUTDIR/gpt2.jsonl
#   report    scripts/bench/gpu_report.py: OUTDIR/gpu_results.json (raw figures, for docs/gpu/) + gpu_results.md
# Earlier sessions' checks stay available by name, outside the default run (raise GPU_CHECK_BUDGET_S):
#   tests-all headline resume sample fp16 nano bench train-gpt2 train-compiled profile
#
#   bash scripts/bench/gpu_check.sh                         # every stage, into gpu_check/
#   bash scripts/bench/gpu_check.sh OUTDIR gpt2 report      # chosen stages
#   GPU_CHECK_DRY=1 bash scripts/bench/gpu_check.sh         # CPU dry run: each stage's command at tiny sizes
#
# The recipe reads tiny shakespeare from $TINY_SHAKESPEARE (default: tiny_shakespeare.txt at the
# repository root, 1,115,394 bytes; karpathy/char-rnn's data/tinyshakespeare/input.txt, which
# nanoGPT downloads); an untracked file there travels to the device machine with the work tree.
# Each stage has its own time limit, and no stage starts past the whole budget (GPU_CHECK_BUDGET_S,
# default 480 s): a stage that would overrun gets what is left, or is skipped, saying so. A failing
# stage does not stop the others. Without a CUDA device (and without GPU_CHECK_DRY=1) it stops at once.
set -u
out=${1:-gpu_check}
shift || true
stages=${*:-env tests overhead gpt2 long recipe others report}
dry=${GPU_CHECK_DRY:-0}
budget=${GPU_CHECK_BUDGET_S:-480}
cd "$(dirname "$0")/../.."  # the repository root
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
tiny=${TINY_SHAKESPEARE:-tiny_shakespeare.txt}

if [[ "$dry" == 1 ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    echo "gpu_check: DRY RUN on the CPU (tiny sizes, nothing measured): checks that every stage's command runs"
elif ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or GPU_CHECK_DRY=1 for the CPU dry run"
    exit 2
fi

started=$SECONDS
stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 t0=$SECONDS rc left
    shift 2
    left=$((budget - (SECONDS - started)))
    if (( left < 5 )); then
        echo "=== $name: SKIPPED, the ${budget} s budget is spent"
        return
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - t0)) s$([[ $rc == 124 ]] && echo ' (TIMED OUT)')"
}
has() { [[ " $stages " == *" $1 "* ]]; }

if [[ "$dry" == 1 ]]; then  # tiny sizes: the same scripts and overrides, shapes a CPU can run
    gpt2_args=(--tiny --device cpu --backend aot_eager --batch 2 --steps 1 --warmup 1 --rounds 1)
    T1024=64; T4096=128; B4096=2
    recipe_extra=(model.n_layer=1 model.n_head=2 model.n_embd=32 model.block_size=32 batch_size=4 max_iters=4
                  eval_interval=2 eval_iters=1 device=cpu compile=false sample_tokens=0)
    if [[ ! -f "$tiny" ]]; then  # the dry run needs only some text in the same format
        tiny=$out/dry_text.txt
        python -c "print(('FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\n') * 200)" > "$tiny"
    fi
else
    gpt2_args=(--steps 8 --warmup 3 --rounds 3)
    T1024=1024; T4096=4096; B4096=4
    recipe_extra=(eval_iters=20 eval_tokens=all sample_tokens=0)  # the val split whole at every eval, cheaper
fi

if has env; then
    python - "$out/env.json" "$dry" <<'EOF'
import datetime, json, sys
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (dry run)"
env = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__, "triton": tv,
       "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
       "dry_run": sys.argv[2] == "1"}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print("env:", env)
EOF
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
fi

if has tests; then
    collect=(); [[ "$dry" == 1 ]] && collect=(--collect-only)
    stage tests 75 python -m pytest -q -p no:cacheprovider "${collect[@]}" tests/test_flash_gpu.py \
        -k "not every_config and not gpt2_small and not nano_fp16 and not maxautotune"
fi

if has overhead; then
    stage host-python 20 sh -c "python scripts/bench/bench_attention.py --host-python --calls 200 --rounds 5 | tee '$out/host_python.txt'"
    if [[ "$dry" == 1 ]]; then
        echo "=== overhead: needs CUDA (its arithmetic is unit-tested in tests/test_bench_attention.py); dry run checks its refusal:"
        python scripts/bench/bench_attention.py --overhead --device cpu 2>&1 | tail -1
    else
        rm -f "$out/overhead.json"
        stage overhead 35 python scripts/bench/bench_attention.py --overhead --seq-lens 1024 4096 --calls 30 --rounds 3 \
            --json "$out/overhead.json"
    fi
fi

if has gpt2 || has long || has others; then [[ -f "$out/gpt2.jsonl" ]] && mv "$out/gpt2.jsonl" "$out/gpt2.jsonl.old"; fi
if has gpt2; then  # the headline: flash vs sdpa, eager and compiled, GPT-2 small 16 x 1024
    stage gpt2 100 python scripts/bench/bench_gpt2.py --attn flash sdpa --seq-len $T1024 --batch 16 "${gpt2_args[@]}" \
        --json "$out/gpt2.jsonl"
fi
if has long; then
    stage long 80 python scripts/bench/bench_gpt2.py --attn flash sdpa --seq-len $T4096 --batch $B4096 "${gpt2_args[@]}" \
        --json "$out/gpt2.jsonl"
fi

if has recipe; then
    if [[ ! -f "$tiny" ]]; then
        echo "=== recipe: SKIPPED, no tiny shakespeare at $tiny (set TINY_SHAKESPEARE=<karpathy/char-rnn data/tinyshakespeare/input.txt>)"
    else
        runs=$out/runs; mkdir -p "$runs"
        for run in flash:1337 sdpa:1337 sdpa:1338; do
            a=${run%%:*}; s=${run##*:}
            stage "recipe-$a-$s" 140 python scripts/train.py +experiment=shakespeare_char data=text data.path="$tiny" \
                attn=$a seed=$s "${recipe_extra[@]}" overwrite=true hydra.run.dir="$runs/recipe-$a-$s" \
                > "$out/recipe-$a-$s.log" 2>&1 &
        done
        wait
        tail -n 3 "$out"/recipe-*.log
    fi
fi

if has others; then  # naive and online in the same table (the slowest compiles, so last)
    stage others 80 python scripts/bench/bench_gpt2.py --attn naive online --seq-len $T1024 --batch 16 "${gpt2_args[@]}" \
        --json "$out/gpt2.jsonl"
fi

# ---- earlier sessions' checks (not in the default run)
summary() {  # summary RUN_DIR: one line of the run's summary.json
    python -c "import json, sys; from pathlib import Path; p = Path(sys.argv[1]) / 'summary.json'
s = json.loads(p.read_text()) if p.exists() else {}
print(f'SUMMARY {Path(sys.argv[1]).name}: ' + ', '.join(f'{k}={s.get(k)}' for k in ('status', 'step', 'final_val_loss', 'tokens_per_sec', 'mfu', 'peak_mem_bytes', 'wall_time_s')))" "$1"
}
runs=$out/runs
if has tests-all; then
    stage tests-all 300 python -m pytest -q tests/test_flash_gpu.py tests/test_optim_gpu.py tests/test_optim.py -k "gpu or fused" \
        -p no:cacheprovider
fi
if has headline; then stage headline 240 python scripts/train.py attn=flash optim=adamw hydra.run.dir="$runs/headline"; summary "$runs/headline"; fi
if has resume; then
    stage resume 120 python scripts/train.py attn=flash optim=adamw max_iters=2200 resume=true hydra.run.dir="$runs/headline"
    summary "$runs/headline"
fi
if has sample; then
    stage sample-cached 60 python scripts/sample.py "$runs/headline" --num-tokens 500 --temperature 0 --stats
    stage sample-uncached 90 python scripts/sample.py "$runs/headline" --num-tokens 500 --temperature 0 --stats --no-cache
fi
if has fp16; then
    stage fp16 120 python scripts/train.py attn=flash precision=fp16 max_iters=500 eval_interval=250 hydra.run.dir="$runs/fp16-flash"
    summary "$runs/fp16-flash"
fi
if has nano; then
    for p in fp32 bf16; do for a in sdpa flash; do
        stage "nano-$a-$p" 90 python scripts/train.py attn=$a precision=$p max_iters=500 eval_interval=500 hydra.run.dir="$runs/nano-$a-$p"
        summary "$runs/nano-$a-$p"
    done; done
fi
if has bench; then
    stage bench-launch 90 python scripts/bench/bench_launch.py
    stage bench-tflops 240 env TRITON_PRINT_AUTOTUNING=1 python scripts/bench/bench_attention.py --tflops
fi
for c in false true; do
    name=train-gpt2; [[ $c == true ]] && name=train-compiled
    if has $name; then
        for a in flash sdpa; do
            stage "$name-$a" 200 python scripts/train.py model=gpt2 attn=$a precision=bf16 batch_size=16 max_iters=100 \
                warmup_iters=10 eval_interval=100 eval_iters=5 sample_tokens=0 log_interval=20 compile=$c \
                hydra.run.dir="$runs/$name-$a"
            summary "$runs/$name-$a"
        done
    fi
done
if has profile; then
    stage profile 120 python scripts/train.py attn=flash precision=bf16 max_iters=20 eval_interval=0 sample_tokens=0 \
        profile=true hydra.run.dir="$runs/profile"
    head -15 "$runs/profile/profile/top_ops.txt" 2>&1
fi

if has report; then
    python scripts/bench/gpu_report.py "$out" > /dev/null && echo "=== report: $out/gpu_results.md, $out/gpu_results.json" \
        && cat "$out/gpu_results.md"
fi
echo "gpu_check: done in $((SECONDS - started)) s (budget ${budget} s)"
