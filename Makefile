# apollo-train: `make demo` sets up and shows in-place training on a tiny built-in model;
# `make test` runs the test suite (real vLLM, CPU build). Every target sets up what it needs.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.apollo-train-installed
# CPU machines get the CPU build of vLLM; it pins torch 2.13.0+cpu from PyTorch's CPU index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRA := $(if $(HAS_GPU),gpu,cpu)
MODEL ?=
PORT ?= 8000
export HF_HUB_OFFLINE ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup test demo serve bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(EXTRA),cpu)
	# A local wheel where pip's find-links has one (its dependencies come from PyPI below).
	$(PIP) install -q --no-index --no-deps torch==2.13.0 2>/dev/null || \
		$(PIP) install -q torch==2.13.0 --index-url $(TORCH_CPU_INDEX)
endif
	# setuptools warns at every editable install (a UserWarning banner that reads like an error)
	PYTHONWARNINGS=ignore::UserWarning $(PIP) install -q -e ".[$(EXTRA),test]"
ifeq ($(EXTRA),cpu)
	# Built for CUDA torch, these break imports next to the CPU torch; vLLM serves text without them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
endif
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/apollo-train demo --port $(PORT)

serve: $(STAMP)
	$(VENV)/bin/apollo-train serve $(MODEL) --port $(PORT)

# Benchmarks on this machine (CPU: the demo model; see docs/performance.md and scripts/gpu_run.sh for GPUs).
BENCH_OUT ?= bench-results
BENCH_MODEL = $$($(PY) -c "from apollo_train.tiny_models import demo_model_dir; print(demo_model_dir())")
BENCH_SERVER = -- --enforce-eager --dtype bfloat16 --max-model-len 1024
bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/optim_bench.py --out $(BENCH_OUT)/optim.md
	$(PY) benchmarks/loss_memory_bench.py --json $(BENCH_OUT)/loss_memory.json
	$(PY) benchmarks/checkpoint_bench.py --model $(BENCH_MODEL) --port $(PORT) --concurrency 4 --max-tokens 32 \
		--min-samples 100 --json $(BENCH_OUT)/checkpoint.json $(BENCH_SERVER)
	$(PY) benchmarks/serving_bench.py --model $(BENCH_MODEL) --port $(PORT) --concurrency 16 --max-tokens 32 \
		--json $(BENCH_OUT)/serving.json $(BENCH_SERVER)
	$(PY) benchmarks/train_throughput_bench.py --model $(BENCH_MODEL) --port $(PORT) --examples 16 --epochs 2 \
		--json $(BENCH_OUT)/train_throughput.json $(BENCH_SERVER)

lint: $(STAMP)
	$(PIP) install -q ruff
	$(VENV)/bin/ruff check apollo_train worker tests benchmarks

clean:
	rm -rf $(VENV)
