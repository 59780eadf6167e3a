#!/usr/bin/env bash
# Every GPU figure the README and the speed issues ask for, in one call of a few minutes on one
# GPU (e.g. an H200 through the device tool), then a summary table against the targets.
#
#   bash tools/gpu_wheels.sh                         # here, once: wheels the GPU image lacks
#   bash tools/gpu_benchmark.sh                      # there, with .whl carried
#   SMOKE=1 bash tools/gpu_benchmark.sh              # tiny sizes, any machine
#   PARTS=train,quality bash tools/gpu_benchmark.sh  # some parts only (tests: SMOKE=1 and these)
#
# Parts, most important first, each under a time limit: at most LIMIT seconds and what is left
# of BUDGET (default 540: one device call is at most 10 minutes). A part that fails or runs
# out of time is reported and the rest still run; one with under 30 s left is skipped.
#   train       benchmark CNN, f32 (JAX default precision), fast and straightforward JAX,
#               PyTorch eager (TF32 on, the like-for-like partner) at 8192 and 65536, and a
#               jax.profiler trace of the fast step at each batch
#   train_bf16  the same JAX step with bfloat16 compute
#   quality     f32 vs bf16 held-out AUC on planted data (does mixed precision keep AUC?)
#   rank        candidates/s of the default and the full ranker, score fn and eval step
#   rank_train  the full ranker's own training examples/s (its row-sparse step) at 8192
#   scale       dense Adam vs the engine's row-sparse update, 100K vs 10M items (embedding 64),
#               and the benchmark CNN's step at max_len 50 vs 200
#   train_compile  torch.compile at 65536 (last: its compile is long)
# JSON lines, logs and jax.profiler traces of the train part go to $GPU_BENCH_DIR (default
# /tmp/gpu_benchmark); tools/bench/gpu_summary.py prints the table last and
# tools/bench/profile_summary.py where the train step's device time goes. Where $OUT is set
# (the device tool's output folder, which takes few files) the folder is archived there as
# gpu_benchmark.tgz (the traces apart, in profile.tgz), with summary.txt beside it. Needs jax
# (with CUDA for GPU figures) and, for the reference, torch in python3; the repository itself
# need not be installed.
set -uo pipefail
cd "$(dirname "$0")/.."

export XLA_PYTHON_CLIENT_PREALLOCATE=false # leave GPU memory to the torch reference too
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
out="${GPU_BENCH_DIR:-/tmp/gpu_benchmark}"
mkdir -p "$out"
archive() { # the whole folder as one file in $OUT, also after a failure
  [ -n "${OUT:-}" ] && [ "$OUT" != "$out" ] || return 0
  tar czf "$OUT/gpu_benchmark.tgz" --exclude=./profile -C "$out" .
  [ -d "$out/profile" ] && tar czf "$OUT/profile.tgz" -C "$out" profile
  cp -f "$out/summary.txt" "$OUT/" 2>/dev/null
  return 0
}
trap archive EXIT

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/influence_jax_site .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/influence_jax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -c "import jax, flax, optax, ml_collections" 2>"$out/imports.log"; then
  cat "$out/imports.log" >&2
  echo "gpu_benchmark: a required package is missing (above); on a machine with PyPI run" \
    "'bash tools/gpu_wheels.sh' and carry .whl with the call" >&2
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

if [ "${SMOKE:-0}" = 1 ]; then # minutes of CPU at most: checks that every part runs
  B1=64 B2=128 ITEMS=2000 BIG_ITEMS=20000 STEPS=80 TEST=4096 LIMIT=300 TRAIN_BATCHES=64
  common=(--seconds=0.05 --repeats=1)
  scale=(--scale_vocabs="$ITEMS,$BIG_ITEMS" --scale_embed_dim=16 --scale_lens=8,16)
else
  B1=8192 B2=65536 ITEMS=100000 BIG_ITEMS=10000000 STEPS=300 TEST=131072 LIMIT=200
  TRAIN_BATCHES=8192,65536
  common=(--seconds=1.0 --repeats=3)
  scale=(--scale_vocabs="$ITEMS,$BIG_ITEMS" --scale_embed_dim=64 --scale_lens=50,200)
fi

part() { # part NAME ARGS...: one benchmark.py run, JSON lines to $out/NAME.jsonl
  local name=$1 rc left=$((${BUDGET:-540} - SECONDS)) limit
  shift
  case ",${PARTS:-all}," in *",$name,"* | ",all,") ;; *) return 0 ;; esac
  if [ $left -lt 30 ]; then
    echo "== $name skipped: ${left} s of the budget left" >&2
    echo "{\"part\": \"$name\", \"rc\": \"skipped\"}" >>"$out/parts.jsonl"
    return 0
  fi
  limit=$((left < LIMIT ? left : LIMIT))
  echo "== $name ($limit s at most): benchmark.py $*" >&2
  local t0=$SECONDS
  timeout "$limit" python3 tools/benchmark.py --json "$@" >"$out/$name.jsonl" 2>"$out/$name.log"
  rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$out/parts.jsonl"
  [ $rc = 0 ] || { echo "== $name failed (exit $rc):" >&2; tail -n 15 "$out/$name.log" >&2; }
}

: >"$out/parts.jsonl"
part train --what=train --batches="$TRAIN_BATCHES" --variants=fast,straightforward \
  --compare=torch-eager --profile_dir="$out/profile" "${common[@]}"
part train_bf16 --what=train --dtype=bfloat16 --batches="$B1,$B2" --variants=fast "${common[@]}"
part quality --what=quality --batches="$B1" --quality_steps="$STEPS" --quality_item_vocab="$ITEMS" \
  --quality_test_examples="$TEST"
part rank --what=rank --batches="$B1,$B2" --rank_models=default,full --rank_measure=score \
  "${common[@]}"
# The ranker's training uses the row-sparse update, whose XLA:GPU compile stalled in the first
# GPU run: after the scoring rates, and the engine's own sparse-vs-dense scan first.
part rank_train --what=rank --batches="$B1" --rank_models=full --rank_measure=train "${common[@]}"
part scale --what=scale --scale_batch="$B1" "${scale[@]}" "${common[@]}"
# torch.compile's long compile last: the targets compare with PyTorch eager.
[ "${SMOKE:-0}" = 1 ] || part train_compile --what=train --batches="$B2" --variants=fast \
  --compare=torch-compile "${common[@]}"

python3 tools/bench/gpu_summary.py "$out" | tee "$out/summary.txt"
python3 tools/bench/profile_summary.py "$out/profile" --top=12 2>&1 | tee -a "$out/summary.txt"
