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
	$(PIP) install -q -e ".[$(EXTRA),test]"
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

bench: $(STAMP)
	$(PY) benchmarks/optim_bench.py --out docs/bench-optim-cpu.md

lint: $(STAMP)
	$(PIP) install -q ruff
	$(VENV)/bin/ruff check apollo_train worker tests benchmarks

clean:
	rm -rf $(VENV)
