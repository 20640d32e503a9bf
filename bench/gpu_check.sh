#!/usr/bin/env bash
# One-call GPU verification for a CUDA machine without network. From the repository root:
#
#     bash bench/gpu_check.sh OUTDIR
#
# Steps, each under `timeout`, each logged to OUTDIR/logs/NAME.log; a failure is recorded and the script goes on:
#   env        nvidia-smi, python / torch / triton versions, git commit
#   install    pip install --no-deps --no-build-isolation -e .  (fallback: a copy of the package on PYTHONPATH)
#   import     flamingo_fast and flamingo_fast.kernels import
#   tests      pytest -m cuda tests                                  (junit XML in OUTDIR/cuda_tests.xml)
#   kernels    python bench/gpu_kernels.py --out OUTDIR/kernels     (when the file exists; --dry-run on the CPU)
#   bandwidth  device-to-device copy bandwidth (bench/bandwidth.py measure)
#   decode_paths  decode ms/token before and after each decode-path change, one process, one model
#              (bench/decode_paths.py: before, +fused_projections, +rotary_kv_write, +decode_attention, then each
#              "all but X"; 32 shots, batches 1 and 8; same-ids and logits diff against "before")
#   numerics   bf16 fast vs bf16 reference, both against a float32 reference (bench/numerics.py; CUDA only)
#   breakdown  device time per kernel over eager decode steps (bench/decode_breakdown.py; CUDA only), after the
#              changes; breakdown_before: the same with every old decode path (FLAMINGO_FAST_OLD_DECODE)
#   profile_bN flamingo-fast profile at OpenFlamingo-9B shape, random bf16 weights, shots 0,4,8,16,32,
#              reference vs fast, batch N (1 and 8); JSON rewritten after every row, so a timeout keeps rows
#   profile_idefics  the IDEFICS-9B shape at batch 1, 0 and the largest shot count: reference vs fast, and
#              transformers' own IDEFICS generate first when transformers is importable
#   openflamingo  OpenFlamingo's own generate vs fast at the preset's shape, batch 1, when bench/gpu_wheels.sh's
#              wheels were carried (.whl/)
#   int8_matmul   the int8 weight matmul at the 9B decode shapes, M 1-32: Triton kernel and aten's op vs
#              bf16 F.linear, GB/s as % of the measured copy bandwidth; goal: the Triton kernel's decode-step matmuls
#              at M <= 8 at >= 80% of it, PASS / FAIL (bench/int8_matmul.py; the CPU form: tiny shapes, no Triton)
#   profile_int8  9B (GPU_CHECK_INT8_PRESET, default openflamingo-9b-v2: MPT-7B) batch-1 decode with bf16
#              and int8 weights through the profiler, its floor table, and the goal: int8 at most 4.0 ms/token
#   int8_80b   IDEFICS-80B's weight bytes in bf16 and int8 and what an H200 keeps after weights + caches,
#              counted on the meta device (`profile --device meta`): a random-weight 80B cannot be built on the
#              machine (bf16: 160 GB, more than the H200's 141 GB and the host's 128 GiB), so nothing is allocated
#   mllama_11b Llama 3.2 Vision at the 11B shapes, random bf16 weights on the GPU (~21 GB: fits an H100), batch 1,
#              one 4-tile image: from_mllama's decode ms/token against the floor of the bytes a step reads (~18.4 GB
#              of bf16 weights + the image's K/V) / the measured copy bandwidth, and transformers' own generate as
#              the baseline when transformers is importable (bench/mllama_gpu.py; the CPU dry run: mllama-tiny).
#              Its decode self-attention before the kernels: FLAMINGO_FAST_OLD_DECODE=rotary_kv_write,decode_attention
#              GPU_CHECK_STEPS=mllama_11b (never measured yet)
#   batch_invariant  the default against batch_invariant=True (bench/batch_invariant.py: TTFT cold and warm, decode,
#              score; and whether row 0 alone equals row 0 in the batch bit for bit, in each mode); never run on a GPU yet
#   floor      decode ms per token vs the memory-bandwidth floor (bench/bandwidth.py floor)
# then OUTDIR/summary.md, whose short form (steps + floor table) is printed last.
#
# The whole run stays under GPU_CHECK_BUDGET_S (default 450 s): each step's timeout is its own cap or what is left
# of the budget (minus a reserve for floor + summary), whichever is smaller; a step with no time left is skipped.
#
# Environment knobs: PYTHON (default python3); GPU_CHECK_CPU=1 is a dry run on the CPU (tiny preset, float32,
# shots 0,2, batches 1 and 2, CUDA hidden); GPU_CHECK_PRESET, GPU_CHECK_SHOTS, GPU_CHECK_BATCHES ("1 8"),
# GPU_CHECK_IMPL, GPU_CHECK_NEW_TOKENS, GPU_CHECK_REPEATS, GPU_CHECK_WARMUP, GPU_CHECK_SKIP_INSTALL=1,
# GPU_CHECK_INSTALL=copy (skip pip: the package copied under OUTDIR/pylib, on PYTHONPATH),
# GPU_CHECK_TRACE=1 (chrome traces of the batch-1 profile under OUTDIR/traces),
# GPU_CHECK_DECODE_PATHS_ARGS (extra arguments of bench/decode_paths.py, e.g. "--new-tokens 8"),
# GPU_CHECK_INT8_PRESET (profile_int8 and int8_matmul's shapes; default openflamingo-9b-v2), GPU_CHECK_INT8_GOAL_MS (4.0),
# GPU_CHECK_MLLAMA_PRESET (the mllama_11b step's shapes on CUDA; default mllama-11b),
# GPU_CHECK_STEPS (a comma-separated subset of the steps to run, e.g. "tests,decode_paths,profile_b1"; env,
# install and import always run, floor when the bandwidth and the profiles were measured): the steps' caps add up
# to more than one 600 s device call, so a session splits the check into two calls.
# FLAMINGO_FAST_OLD_DECODE=name,... (runtime/runtime.py) puts named decode paths back on the old code in every step that
# does not set it itself: e.g. the whole run "before" with fused_projections,rotary_kv_write,decode_attention.
set -u

if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$1/logs" || exit 2
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
export PY
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=30

if [ "${GPU_CHECK_CPU:-0}" = "1" ]; then
    export CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu; DTYPE=float32
    PRESET=${GPU_CHECK_PRESET:-tiny}; SHOTS=${GPU_CHECK_SHOTS:-0,2}; BATCHES=${GPU_CHECK_BATCHES:-1 2}
    BW_GIB=0.25
else
    DEVICE=cuda; DTYPE=bfloat16
    PRESET=${GPU_CHECK_PRESET:-openflamingo-9b-v1}; SHOTS=${GPU_CHECK_SHOTS:-0,4,8,16,32}
    BATCHES=${GPU_CHECK_BATCHES:-1 8}; BW_GIB=4
fi
IMPL=${GPU_CHECK_IMPL:-reference,fast}
NEW_TOKENS=${GPU_CHECK_NEW_TOKENS:-8}
REPEATS=${GPU_CHECK_REPEATS:-2}
WARMUP=${GPU_CHECK_WARMUP:-1}

printf 'step\tstatus\tseconds\tlimit_s\n' >"$OUT/steps.tsv"

# run_step NAME CAP_SECONDS CMD...: runs CMD under timeout, logs to OUT/logs/NAME.log, records the status.
run_step() {
    local name=$1 cap=$2 left limit t0 rc status
    shift 2
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS,env,import,install," != *",$name,"* ]]; then
        printf '%s\tskipped (not in GPU_CHECK_STEPS)\t0\t0\n' "$name" >>"$OUT/steps.tsv"
        return 1
    fi
    left=$((START + BUDGET - RESERVE - $(date +%s)))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 5 ]; then
        printf '%s\tskipped (time budget)\t0\t0\n' "$name" >>"$OUT/steps.tsv"
        echo "[gpu_check] $name: skipped, the time budget is spent" >&2
        return 1
    fi
    echo "[gpu_check] $name (up to ${limit}s): $*" >&2
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then  # a shell function: `timeout` needs a process, so a child bash runs it
        timeout -k 10 "$limit" bash -c "$(declare -f "$1"); $*" >"$OUT/logs/$name.log" 2>&1
    else
        timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    fi
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$limit" >>"$OUT/steps.tsv"
    echo "[gpu_check] $name: $status ($(($(date +%s) - t0))s); log: $OUT/logs/$name.log" >&2
    [ $rc -eq 0 ]
}

env_report() {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    echo "git $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
}

# A package tree without pip: flamingo_fast/ with kernels/ as its `kernels` subpackage (what setup.py maps).
copy_install() {
    rm -rf "$OUT/pylib" && mkdir -p "$OUT/pylib" &&
        cp -r flamingo_fast "$OUT/pylib/flamingo_fast" && rm -rf "$OUT/pylib/flamingo_fast/kernels" &&
        cp -r kernels "$OUT/pylib/flamingo_fast/kernels" &&
        cp bench/common.py bench/bandwidth.py "$OUT/pylib/"  # PYTHONSAFEPATH drops bench/ from a script's sys.path
}

run_step env 20 env_report

if [ "${GPU_CHECK_INSTALL:-pip}" = "copy" ]; then
    copy_install
    export PYTHONPATH="$OUT/pylib${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    printf 'install\tcopy on PYTHONPATH (GPU_CHECK_INSTALL=copy)\t0\t0\n' >>"$OUT/steps.tsv"
elif [ "${GPU_CHECK_SKIP_INSTALL:-0}" != "1" ]; then
    if ! run_step install 90 "$PY" -m pip install --no-deps --no-build-isolation -e . -q; then
        echo "[gpu_check] editable install failed: using a copy of the package on PYTHONPATH" >&2
        copy_install
        export PYTHONPATH="$OUT/pylib${PYTHONPATH:+:$PYTHONPATH}"
        export PYTHONSAFEPATH=1  # the repo's own flamingo_fast/ (no kernels/ inside) must not shadow the copy
    fi
fi
run_step import 30 "$PY" -c 'import flamingo_fast, flamingo_fast.kernels, flamingo_fast.profiling.profiler; print(flamingo_fast.__file__)'

run_step tests 120 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml"

if [ -f bench/gpu_kernels.py ]; then
    # its own budget stops starting new cases after 60 s; the cap leaves room for the case in flight
    KERNEL_ARGS=(--budget-s 60)
    if [ "$DEVICE" = cpu ]; then KERNEL_ARGS+=(--dry-run); fi
    run_step kernels 90 "$PY" bench/gpu_kernels.py --out "$OUT/kernels" "${KERNEL_ARGS[@]}"
else
    printf 'kernels\tskipped (bench/gpu_kernels.py not present)\t0\t0\n' >>"$OUT/steps.tsv"
fi

run_step bandwidth 30 "$PY" bench/bandwidth.py measure --out "$OUT/bandwidth.json" --gib "$BW_GIB"

# Weight-only int8. Time estimates from the H200 run of 2026-11-28 (bench/results/2026-11-28-h200-38f5836:
# a 9B bf16 model random-initialised in 0.25 s, profile_b1's 10 rows in 19 s, import 3 s, do_bench cases in the
# kernels step well under 1 s each); none of these three steps has run on a GPU yet:
#   int8_matmul   ~90 s: ~10 s imports and the 9B meta build (shapes), ~10 s Triton compiles (4-6 variants), 7
#                 shapes x 6 M x 4 timings (3 do_bench_cudagraph + 1 do_bench, ~0.2-0.4 s each) ~60 s, float64
#                 checks at M 8 ~2 s. Its own --budget-s 75 starts no new M after 75 s (16 and 32 are last); cap 120.
#   profile_int8  ~45 s: the bf16 9B random init ~0.3 s, the int8 copy (quantized block by block on the GPU) ~5 s,
#                 Triton compiles + CUDA-graph capture in the warm-up calls ~20 s, 2 shot counts x 2 formats x 3
#                 calls of 16 tokens ~5 s, the floor table ~10 s (its 9B meta parameter count); cap 120.
#   int8_80b      ~25 s, CPU only: two meta builds of the 80B (bf16 and int8) per batch size, ~5-10 s each; cap 60.
# About 160 s in all: with the machine's start, one call of `GPU_CHECK_STEPS=bandwidth,int8_matmul,profile_int8,
# int8_80b` takes about 4 minutes (bench/RESULTS.md, "What the GPU run must measure (int8)").
if [ "$DEVICE" = cuda ]; then
    INT8_PRESET=${GPU_CHECK_INT8_PRESET:-openflamingo-9b-v2}; INT8_M=1,2,4,8,16,32; INT8_ARGS=(--budget-s 75)
else  # the dry run: tiny shapes, the CPU's implementations (no Triton timing), the tiny preset's decode on torch
    INT8_PRESET=tiny; INT8_M=1,2,4,8; INT8_ARGS=(--repeats 1 --rotate-mib 4)
fi
if [ -f "$OUT/bandwidth.json" ]; then INT8_ARGS+=(--bandwidth "$OUT/bandwidth.json"); else INT8_ARGS+=(--gib "$BW_GIB"); fi
run_step int8_matmul 120 "$PY" bench/int8_matmul.py --preset "$INT8_PRESET" --m "$INT8_M" --goal-pct 80 \
    --json "$OUT/int8_matmul.json" --md "$OUT/int8_matmul.md" "${INT8_ARGS[@]}"

# The 9B's batch-1 decode with bf16 and with int8 weights (one fast row each, fast-bf16 the baseline), its floor
# table, and the goal line (at most INT8_GOAL_MS per token with int8 weights).
INT8_GOAL_MS=${GPU_CHECK_INT8_GOAL_MS:-4.0}
int8_profile() {
    set -o pipefail  # the goal line goes through tee: keep python's status
    "$PY" -m flamingo_fast profile --preset "$INT8_PRESET" --shots 0,4 --batch 1 --impl fast --weights bf16,int8 \
        --device "$DEVICE" --dtype bfloat16 --new-tokens 16 --repeats 2 --warmup 1 --no-progress \
        --json "$OUT/profile_int8.json" || return $?
    if [ -f "$OUT/bandwidth.json" ]; then
        "$PY" bench/bandwidth.py floor --bandwidth "$OUT/bandwidth.json" --profile "$OUT/profile_int8.json" \
            --md "$OUT/floor_int8.md" >/dev/null || echo "floor table for the int8 profile: failed"
    fi
    "$PY" -c 'import json, sys
rows, goal, device = json.load(open(sys.argv[1]))["rows"], float(sys.argv[2]), sys.argv[3]
fmt = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
bf16 = {r["shots"]: r for r in rows if r["impl"] == "fast-bf16"}
int8 = [r for r in rows if r["impl"] == "fast-int8"]
for r in int8:
    b = bf16.get(r["shots"], {})
    shots, ms, b_ms, mib, b_mib, peak = (r["shots"], r["decode_ms_p50"], b.get("decode_ms_p50"), r["weight_mib"],
                                         b.get("weight_mib"), r["peak_mem_mib"])
    print(f"fast-int8 batch 1, {shots} shots: decode p50 {fmt(ms)} ms/token (fast-bf16 {fmt(b_ms)}), weights "
          f"{fmt(mib, 0)} MiB (bf16 {fmt(b_mib, 0)}), peak {fmt(peak, 0)} MiB")
times = [r["decode_ms_p50"] for r in int8]
worst = max(times) if times and None not in times else None
verdict = "not measured" if worst is None else ("PASS" if worst <= goal else "FAIL") if device == "cuda" else \
    "not checked (a CPU dry run)"
print(f"goal: int8 batch-1 decode at most {goal:g} ms/token: slowest p50 {fmt(worst)} ms -> {verdict}")' \
        "$OUT/profile_int8.json" "$INT8_GOAL_MS" "$DEVICE" | tee "$OUT/int8_goal.txt"
}
export OUT INT8_PRESET INT8_GOAL_MS DEVICE
run_step profile_int8 120 int8_profile

# IDEFICS-80B: bytes per weight format and the fit, on the meta device (see the header: no 80B can be built here).
run_step int8_80b 60 "$PY" -m flamingo_fast profile --preset idefics-80b --impl fast --weights bf16,int8 \
    --dtype bfloat16 --device meta --shots 0,32 --batch 1,8 --new-tokens 16 --json "$OUT/int8_80b.json"

# Llama 3.2 Vision at the 11B shapes (never run on a GPU yet). Estimate on an H100: imports ~10 s, the random bf16
# model built and drawn on the GPU ~10 s, transformers' generate (4 calls of 32 tokens, eager) ~10 s, the fast
# path's Triton compiles in the warm-up ~30 s and its calls ~5 s: ~70 s; cap 180.
if [ "$DEVICE" = cuda ]; then MLLAMA_PRESET=${GPU_CHECK_MLLAMA_PRESET:-mllama-11b}; MLLAMA_NEW=32
else MLLAMA_PRESET=mllama-tiny; MLLAMA_NEW=4; fi
MLLAMA_ARGS=(--preset "$MLLAMA_PRESET" --device "$DEVICE" --new-tokens "$MLLAMA_NEW" --out "$OUT/mllama_11b")
if [ -f "$OUT/bandwidth.json" ]; then MLLAMA_ARGS+=(--bandwidth "$OUT/bandwidth.json"); else MLLAMA_ARGS+=(--gib "$BW_GIB"); fi
run_step mllama_11b 180 "$PY" bench/mllama_gpu.py "${MLLAMA_ARGS[@]}"

# Decode paths: decode before and after each change, in one process (the model is built once).
ALL_OLD=fused_projections,rotary_kv_write,decode_attention
if [ "$DEVICE" = cuda ]; then
    DP_ARGS=(--preset "$PRESET" --shots "${SHOTS##*,}" --batches "${BATCHES// /,}" --new-tokens 16 --repeats 3
             --device cuda --dtype bfloat16 --leave-one-out)
else  # the dry run: the same script on the tiny preset (the torch backend's twins; only that it runs)
    DP_ARGS=(--preset "$PRESET" --shots 2 --batches "${BATCHES// /,}" --new-tokens 4 --repeats 1 --device cpu)
fi
# shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
DP_ARGS+=(${GPU_CHECK_DECODE_PATHS_ARGS:-})
run_step decode_paths 120 "$PY" bench/decode_paths.py "${DP_ARGS[@]}" --json "$OUT/decode_paths.json" \
    --md "$OUT/decode_paths.md"

# bf16 error of the fast path against a float32 reference, next to plain torch's bf16 error (tests/helpers.py's rule),
# and the device-time breakdown of eager decode steps.
if [ "$DEVICE" = cuda ]; then
    run_step numerics 90 "$PY" bench/numerics.py --preset "$PRESET" --shots 4 --batch 2 --json "$OUT/numerics.json"
    run_step breakdown 60 "$PY" bench/decode_breakdown.py --preset "$PRESET" --shots 8 --md "$OUT/decode_breakdown.md"
    run_step breakdown_before 60 env FLAMINGO_FAST_OLD_DECODE="$ALL_OLD" "$PY" bench/decode_breakdown.py \
        --preset "$PRESET" --shots 8 --md "$OUT/decode_breakdown_before.md"
fi

PROFILES=()
for B in $BATCHES; do
    TRACE=()
    if [ "${GPU_CHECK_TRACE:-0}" = "1" ] && [ "$B" = "1" ]; then TRACE=(--trace "$OUT/traces"); fi
    run_step "profile_b$B" 110 "$PY" -m flamingo_fast profile --preset "$PRESET" --shots "$SHOTS" --batch "$B" \
        --impl "$IMPL" --device "$DEVICE" --dtype "$DTYPE" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" \
        --warmup "$WARMUP" --json "$OUT/profile_b$B.json" --csv "$OUT/profile_b$B.csv" \
        --plot "$OUT/profile_b$B.png" "${TRACE[@]}"
    PROFILES+=("$OUT/profile_b$B.json")
done
# The context cache: warm TTFT of 4 queries on a cached context at the largest shot count (32 on the GPU) against
# the same queries alone.
run_step context_cache 60 "$PY" bench/context_cache_ttft.py --preset "$PRESET" --shots "${SHOTS##*,}" --batch 4 \
    --device "$DEVICE"
# The batch-invariant mode's cost and its bitwise promise, 4 shots, batch 4.
run_step batch_invariant 90 "$PY" bench/batch_invariant.py --preset "$PRESET" --shots 4 --batch 4 --repeats 3 \
    --device "$DEVICE"
# OpenFlamingo's evaluation call: beam 3, short answers, batch 8, at the largest shot count.
run_step profile_beam3 90 "$PY" -m flamingo_fast profile --preset "$PRESET" --shots "${SHOTS##*,}" --batch 8 \
    --num-beams 3 --impl "$IMPL" --device "$DEVICE" --dtype "$DTYPE" --new-tokens 10 --repeats "$REPEATS" \
    --warmup "$WARMUP" --json "$OUT/profile_beam3.json" --csv "$OUT/profile_beam3.csv"
# The IDEFICS-9B shape: fast vs the reference, and transformers' own generate when it is installed.
if [ "$DEVICE" = cpu ]; then IDEFICS_PRESET=idefics-tiny; else IDEFICS_PRESET=${GPU_CHECK_IDEFICS_PRESET:-idefics-9b}; fi
IDEFICS_IMPL=reference,fast
if "$PY" -c 'import transformers' >/dev/null 2>&1; then IDEFICS_IMPL=idefics,reference,fast; fi
run_step profile_idefics 90 "$PY" -m flamingo_fast profile --preset "$IDEFICS_PRESET" --shots "0,${SHOTS##*,}" \
    --batch 1 --impl "$IDEFICS_IMPL" --device "$DEVICE" --dtype "$DTYPE" --new-tokens "$NEW_TOKENS" \
    --repeats "$REPEATS" --warmup "$WARMUP" --json "$OUT/profile_idefics.json" --csv "$OUT/profile_idefics.csv"

# OpenFlamingo's own generate at the 9B shape, the baseline users have: only when the wheels from
# bench/gpu_wheels.sh were carried (.whl/), installed into a folder that only this step puts on PYTHONPATH.
if ls .whl/open_flamingo-*.whl >/dev/null 2>&1; then
    OF_SITE=$(mktemp -d)
    of_profile() {
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$OF_SITE" .whl/*.whl &&
            PYTHONPATH="$OF_SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m flamingo_fast profile --preset "$PRESET" \
                --shots "0,${SHOTS##*,}" --batch 1 --impl openflamingo,fast --device "$DEVICE" --dtype "$DTYPE" \
                --new-tokens "$NEW_TOKENS" --repeats 1 --warmup 1 --json "$OUT/profile_openflamingo.json" \
                --csv "$OUT/profile_openflamingo.csv"
    }
    export OF_SITE OUT PRESET SHOTS DEVICE DTYPE NEW_TOKENS
    run_step openflamingo 120 of_profile
else
    printf 'openflamingo\tskipped (no .whl/open_flamingo-*.whl: bash bench/gpu_wheels.sh, carry .whl)\t0\t0\n' \
        >>"$OUT/steps.tsv"
fi

# From here on the reserve is used: the budget check is lifted for the last two steps.
RESERVE=-30
if [ -f "$OUT/bandwidth.json" ] && ls "${PROFILES[@]}" >/dev/null 2>&1; then
    GPU_CHECK_STEPS= run_step floor 20 "$PY" bench/bandwidth.py floor --bandwidth "$OUT/bandwidth.json" --profile "${PROFILES[@]}" \
        --json "$OUT/floor.json" --md "$OUT/floor.md"
else
    printf 'floor\tskipped (needs the bandwidth and profile_bN steps)\t0\t0\n' >>"$OUT/steps.tsv"
fi

write_summary() {
    {
        echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo
        grep -E '^(git|device|torch|triton|python) ' "$OUT/logs/env.log" 2>/dev/null | sed 's/^/    /'
        echo
        echo "preset $PRESET, $DTYPE on $DEVICE, shots $SHOTS, batches $BATCHES, impl $IMPL, $NEW_TOKENS new tokens,"
        echo "$REPEATS repeats after $WARMUP warm-up; total $(($(date +%s) - START)) s"
        echo
        echo "## Steps"
        echo
        echo "| step | status | s | limit s |"
        echo "| --- | --- | ---: | ---: |"
        tail -n +2 "$OUT/steps.tsv" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
        for P in "${PROFILES[@]}" "$OUT/profile_idefics.json" "$OUT/profile_openflamingo.json"; do
            [ -f "$P" ] || continue
            echo
            echo "## Profile $(basename "$P")"
            echo
            "$PY" -c 'import json, sys
from flamingo_fast.profiling.report import format_table, load_json
print(format_table(load_json(sys.argv[1])))
if not json.load(open(sys.argv[1]))["complete"]:
    print("\n(partial: the step stopped before every row was measured)")' "$P" 2>&1
        done
        if [ -f "$OUT/floor.md" ]; then
            echo
            echo "## Decode vs the memory-bandwidth floor"
            echo
            cat "$OUT/floor.md"
        fi
        if [ -f "$OUT/logs/numerics.log" ]; then
            echo
            echo "## Numerics (bf16 vs a float32 reference)"
            echo
            cat "$OUT/logs/numerics.log"
        fi
        if [ -f "$OUT/decode_paths.md" ]; then
            echo
            echo "## Decode before and after each change (bench/decode_paths.py)"
            echo
            cat "$OUT/decode_paths.md"
        fi
        if [ -f "$OUT/decode_breakdown.md" ]; then
            echo
            echo "## Decode device-time breakdown (after)"
            echo
            cat "$OUT/decode_breakdown.md"
        fi
        if [ -f "$OUT/decode_breakdown_before.md" ]; then
            echo
            echo "## Decode device-time breakdown (before: FLAMINGO_FAST_OLD_DECODE=$ALL_OLD)"
            echo
            cat "$OUT/decode_breakdown_before.md"
        fi
        if [ -f "$OUT/kernels/kernels_gpu.md" ]; then
            echo
            sed 's/^# /## /' "$OUT/kernels/kernels_gpu.md"
        fi
        if [ -f "$OUT/int8_matmul.md" ]; then
            echo
            echo "## int8 weight matmul (bench/int8_matmul.py)"
            echo
            cat "$OUT/int8_matmul.md"
        fi
        if [ -f "$OUT/profile_int8.json" ]; then
            echo
            echo "## int8 decode ($INT8_PRESET, batch 1, bf16 vs int8 weights)"
            echo
            "$PY" -c 'import sys
from flamingo_fast.profiling.report import format_table, load_json
print(format_table(load_json(sys.argv[1])))' "$OUT/profile_int8.json" 2>&1
            if [ -f "$OUT/floor_int8.md" ]; then echo; cat "$OUT/floor_int8.md"; fi
            if [ -f "$OUT/int8_goal.txt" ]; then echo; cat "$OUT/int8_goal.txt"; fi
        fi
        if [ -f "$OUT/mllama_11b.md" ]; then
            echo
            echo "## Llama 3.2 Vision ($MLLAMA_PRESET), batch 1, one 4-tile image: decode vs the floor"
            echo
            cat "$OUT/mllama_11b.md"
        fi
        if [ -f "$OUT/logs/int8_80b.log" ]; then
            echo
            echo "## IDEFICS-80B weights by format, counted on the meta device (nothing allocated)"
            echo
            cat "$OUT/logs/int8_80b.log"
        fi
    } >"$OUT/summary.md"
}
write_summary

echo
echo "== gpu_check summary ($OUT/summary.md; logs in $OUT/logs) =="
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
echo
if [ -f "$OUT/floor.md" ]; then cat "$OUT/floor.md"; else echo "no floor table (see logs/floor.log)"; fi
if [ -f "$OUT/decode_paths.md" ]; then echo; cat "$OUT/decode_paths.md"; fi
if [ -f "$OUT/int8_matmul.md" ]; then echo; grep -E '^goal' "$OUT/int8_matmul.md"; fi
if [ -f "$OUT/int8_goal.txt" ]; then cat "$OUT/int8_goal.txt"; fi
if [ -f "$OUT/mllama_11b.md" ]; then echo; cat "$OUT/mllama_11b.md"; fi
echo "total $(($(date +%s) - START)) s"
