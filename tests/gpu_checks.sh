#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one script (CI has no GPU; run this on a GPU machine).
#
#   bash tests/gpu_checks.sh [OUT_DIR]        # logs go to OUT_DIR (default /tmp/turnrl-gpu)
#
# 1. pytest on CUDA: the engine tests (tests/actors/test_engine.py, test_sessions.py,
#    test_lean_forward.py) with TURNRL_TEST_DEVICE=cuda, plus every `gpu`-marked test (DeepSpeed
#    learner on CUDA in bf16, weights into a CUDA engine, NCCL weight groups, the vLLM backend
#    when vLLM is installed).
# 2. Two NCCL ranks on GPU 0 (what a one-GPU machine can say about the two-process broadcast).
# 3. bench_rollout.py on CUDA: the session engine (also with decode steps replayed as CUDA graphs)
#    vs HF generate re-prefilling every turn.
# 4. bench_queue.py and bench_async.py with the GPU hidden (CUDA_VISIBLE_DEVICES=): the Ray
#    queue and the async/sync loop on a host with more cores than the 2-core dev box.
# Each step has its own time limit (seconds, env vars below) so a slow one cannot starve the rest.
set -u
OUT=${OUT:-${1:-/tmp/turnrl-gpu}}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the repo's packages without an editable install

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, print the exit code
  local name=$1 limit=$2
  shift 2
  echo "== $(date +%T) $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "== $(date +%T) $name rc=$rc"
}

nvidia-smi -L 2>&1 | head -2
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

step pytest_gpu "${LIMIT_PYTEST:-200}" env TURNRL_TEST_DEVICE=cuda DS_ACCELERATOR=cuda \
  $PY -m pytest -q -p no:cacheprovider -m "gpu or not slow" -rs \
  tests/actors/test_engine.py tests/actors/test_sessions.py tests/actors/test_lean_forward.py \
  tests/actors/test_cuda_graphs.py tests/actors/test_vllm_engine.py tests/learner/test_cuda_learner.py \
  "tests/actors/test_generators.py::test_nccl_weight_group_single_process"

TAIL=6 step nccl_two_ranks_one_gpu "${LIMIT_NCCL:-60}" $PY -c "
import socket, tempfile, torch
from tests.learner.test_cuda_learner import _two_rank_worker, _free_port
out = tempfile.mktemp()
torch.multiprocessing.spawn(_two_rank_worker, args=(_free_port(), ['cuda:0', 'cuda:0'], out), nprocs=2)
print('two NCCL ranks on one GPU, tensors equal:', torch.load(out, weights_only=True))"

TAIL=8 step bench_rollout_cuda "${LIMIT_ROLLOUT:-200}" $PY tests/benchmarks/bench_rollout.py --device cuda --cuda-graphs \
  --repeats "${ROLLOUT_REPEATS:-3}" --big-questions 8 --big-group 8 --big-turns 4 --big-cap 48

TAIL=6 step bench_queue "${LIMIT_QUEUE:-120}" env CUDA_VISIBLE_DEVICES= $PY tests/benchmarks/bench_queue.py \
  --groups 128 --batch-groups 32 --get-groups 32 --repeats "${QUEUE_REPEATS:-3}"

TAIL=16 step bench_async "${LIMIT_ASYNC:-240}" env CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu \
  $PY tests/benchmarks/bench_async.py --prompts 8 --group-size 8 --steps 3 --warmup 1 --repeats 1 \
  --env-latency "${ASYNC_ENV_LATENCY:-0.5}"
