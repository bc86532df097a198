# Both targets create .venv on first use and install everything they need.
# torch is pinned and installed first: on a CPU-only machine that takes the CPU build,
# and nothing later pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test test-slow install bench clean

$(BIN)/opd: pyproject.toml
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

clean:
	rm -rf $(VENV) runs
