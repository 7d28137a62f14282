#!/usr/bin/env bash
# Everything this project checks and times on a GPU, in stages, for the device tool:
#   bash scripts/gpu_run.sh STAGE [STAGE ...]     (stages: setup exact exact-attend exact-new bench2b bench8b
#                                                  bench8b-long attention ttft2b decode2b ttft2b-prefill ttft2b-qk
#                                                  attention-pascal memory pascal prefill-profile decode-profile
#                                                  decode-profile-8b attention-kernel gemv-forms vision harness)
# Results go to a results store under $OUT (packed as one tarball, since few files come back),
# logs to $OUT/log.txt. Carried wheels (in .gpu_wheels) fill in what the GPU image lacks.
# DEADLINE=S (seconds from the start, default 580) keeps a call inside the device tool's 10 minutes: a stage
# whose limit would end past it is skipped and said so, since a benchmark cut off stores nothing.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
RES=${RES:-/tmp/gpu-results}
mkdir -p "$RES"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
DEADLINE=${DEADLINE:-580}
status=0
stage() {  # stage NAME TIMEOUT COMMAND...
  local name=$1 limit=$2; shift 2
  if (( SECONDS + limit > DEADLINE )); then
    echo "=== $name SKIPPED: its limit ${limit}s would end past the call's deadline (${SECONDS}s of ${DEADLINE}s used)" \
      | tee -a "$LOG"
    status=1; return
  fi
  echo "=== $name ($(date +%T))" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -vE "Warning|warn\(|^\s*$" | tail -n 40
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc" | tee -a "$LOG"
  [ "$rc" = 0 ] || status=1
  # packed after every stage: a call cut off by the device tool's time limit still returns what was stored
  tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
}
for s in "$@"; do
  case $s in
    setup)
      # the device image holds these packages already; carried wheels (if any) only override versions
      stage setup 60 bash -c '[ -d .gpu_wheels ] && pip install -q --no-index --find-links .gpu_wheels psutil \
        py-cpuinfo nvidia-ml-py rich pytest hypothesis pytest-benchmark 2>&1 | tail -3;
        python -c "import torch, transformers, pandas, pyarrow; print(torch.__version__, torch.version.cuda, \
        transformers.__version__, pandas.__version__, pyarrow.__version__, torch.cuda.get_device_name())";
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv' ;;
    exact) stage exact 240 python scripts/gpu_exactness.py ;;
    exact-attend) stage exact-attend 70 python scripts/gpu_exactness.py \
                    --plan "attention=sdpa,kv_cache=static,execution=compile" ;;
    bench2b) stage bench2b 400 python -m harness.bench --preset 2b --device cuda --dtype bf16 --compare transformers \
               --rounds 2 --results-dir "$RES" --plan reference \
               --plan attention=eager,kv_cache=static,execution=cuda_graph \
               --plan attention=sdpa,kv_cache=static,execution=cuda_graph \
               --plan attention=eager,kv_cache=static,execution=compile \
               --plan attention=sdpa,kv_cache=static,execution=compile ;;
    ttft2b) stage ttft2b 420 python -m harness.bench --preset 2b --device cuda --dtype bf16 --compare transformers \
              --rounds 3 --results-dir "$RES" \
              --plan "attention=sdpa,kv_cache=static,execution=compile[gemv=false]" \
              --plan "attention=sdpa,kv_cache=static,execution=compile[host_choice=true]" \
              --plan "attention=sdpa,kv_cache=static,execution=compile[fold=true]" \
              --plan attention=sdpa,kv_cache=static,execution=compile ;;
    decode2b) stage decode2b 230 python -m harness.bench --preset 2b --device cuda --dtype bf16 --compare transformers \
                --transformers-paths static --rounds 3 --results-dir "$RES" \
                --plan attention=sdpa,kv_cache=static,execution=compile \
                --plan "attention=sdpa,kv_cache=static,execution=compile[attend=false]" ;;
    ttft2b-prefill) stage ttft2b-prefill 540 python -m harness.bench --preset 2b --device cuda --dtype bf16 \
                      --compare transformers --transformers-paths sdpa --rounds 3 --new-tokens 32 \
                      --results-dir "$RES" \
                      --plan attention=sdpa,kv_cache=static,execution=compile \
                      --plan "attention=sdpa,kv_cache=static,execution=compile[prefill_compile=true]" ;;
    ttft2b-qk) stage ttft2b-qk 400 python -m harness.bench --preset 2b --device cuda --dtype bf16 \
                 --compare transformers --transformers-paths sdpa --rounds 3 --new-tokens 32 --results-dir "$RES" \
                 --plan attention=sdpa,kv_cache=static,execution=compile \
                 --plan "attention=sdpa,kv_cache=static,execution=compile[prefill_qk=true]" \
                 --plan "attention=sdpa,kv_cache=static,execution=compile[prefill_compile=true]" ;;
    exact-new) stage exact-new 180 python scripts/gpu_exactness.py \
                 --plan "attention=sdpa,kv_cache=static,execution=compile[prefill_qk=true]" \
                 --plan "attention=sdpa,kv_cache=static,execution=compile[prefill_compile=true]" \
                 --plan "attention=sdpa,kv_cache=static,execution=compile[attend_grouped_from=0]" ;;
    bench8b) stage bench8b 330 python -m harness.bench --preset 8b --device cuda --dtype bf16 --compare transformers \
               --transformers-paths static --rounds 2 --new-tokens 64 --results-dir "$RES" \
               --plan attention=sdpa,kv_cache=static,execution=compile \
               --plan "attention=sdpa,kv_cache=static,execution=compile[attend=false]" ;;
    bench8b-long)  # a long prompt (a document or a video's frames): the attention's share of a decode step grows
      stage bench8b-long 480 python -m harness.bench --preset 8b --device cuda --dtype bf16 --compare transformers \
        --transformers-paths static --rounds 2 --new-tokens 64 --prompt-tokens 4000 --results-dir "$RES" \
        --plan attention=sdpa,kv_cache=static,execution=compile \
        --plan "attention=sdpa,kv_cache=static,execution=compile[attend_grouped_from=1000000]" \
        --plan "attention=sdpa,kv_cache=static,execution=compile[attend=false]" ;;
    attention) stage attention 170 python -m harness.bench_attention --preset 2b --device cuda --dtype bf16 \
                 --results-dir "$RES" ;;
    memory) stage memory 420 python -m suites.bench_memory_quant --device cuda --dtype fp16 --parts offload,decode,kv \
              --offload-presets 2b,8b --results-dir "$RES" ;;
    pascal)  # a 2 GiB / 4 GiB Pascal card emulated on this GPU; one process (and one stored run) per preset
      for pt in 2b:200 4b:280 8b:420; do p=${pt%:*}
        stage "pascal-$p" "${pt#*:}" python -m suites.bench_memory_quant --device cuda --dtype fp16 --parts offload \
          --emulate sm61-laptop --offload-presets "$p" --results-dir "$RES"
      done ;;
    attention-pascal) stage attention-pascal 150 python -m harness.bench_attention --preset 2b --device cuda \
                        --dtype fp16 --emulate sm61-laptop --results-dir "$RES" ;;
    prefill-profile) stage prefill-profile 300 python scripts/gpu_prefill_profile.py \
                       --plan attention=sdpa,kv_cache=static,execution=compile ;;
    decode-profile) stage decode-profile 290 python scripts/gpu_decode_profile.py --rounds 3 \
                      --plan attention=sdpa,kv_cache=static,execution=compile \
                      --plan "attention=sdpa,kv_cache=static,execution=compile[attend=false]" ;;
    decode-profile-8b) stage decode-profile-8b 540 python scripts/gpu_decode_profile.py --preset 8b --rounds 3 \
                         --gemv-tile 1,2048,8 --plan "attention=sdpa,kv_cache=static,execution=compile[gemv=false]" \
                         --plan attention=sdpa,kv_cache=static,execution=compile ;;
    attention-kernel) stage attention-kernel 240 python scripts/gpu_attention_kernel.py ;;
    gemv-forms) stage gemv-forms 300 python scripts/gpu_gemv_forms.py --preset 2b ;;
    vision) stage vision 300 python -m pytest -q tests/optim/vision/test_devices.py ;;
    harness) stage harness 540 python -m harness.gpu_check --results-dir "$RES" ;;
    *) echo "unknown stage $s"; status=2 ;;
  esac
done
exit $status
