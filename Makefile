# Two commands on a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m experiments.main --config configs/default.py --methods hyperlora,fedit --workdir runs/default

# After `make run`: its results against the README's table, within stated tolerances.
check-run: $(VENV)/.installed
	$(PY) -m experiments.reports.check_readme --workdir runs/default

# Lint, check the formatting, type-check the library, then every test but the few marked slow
# (multi-process end-to-end runs).
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n auto -m "not slow" --durations=15 tests

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -n auto -m "slow and not sweep" --durations=15 tests

# Every method on every decoder family's fixture directory (52 runs, about 6 minutes on 2 cores).
test-sweep: $(VENV)/.installed
	$(PY) -m pytest -q -n auto -m sweep --durations=5 tests

test-all: test test-slow test-sweep

# The plan on compile-only TPU and GPU devices (tests/library/test_plan.py, test_plan_cli.py): a
# venv beside .venv holding only the compilers, reading .venv's packages, so that .venv itself
# never loads them. Versions: those of the installed jax (0.10.2; LIBTPU is what jax[tpu] pins).
LIBTPU ?= libtpu==0.0.42.1
CUDA_PLUGIN ?= jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
PLAN_VENV ?= .venv-plan
test-plan: $(VENV)/.installed
	$(PYTHON) -m venv $(PLAN_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(PLAN_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/project_venv.pth"
	$(PLAN_VENV)/bin/python -m pip install -q --no-deps $(LIBTPU) $(CUDA_PLUGIN)
	JAX_PLATFORMS=cpu $(PLAN_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/library/test_plan.py \
	  tests/end_to_end/test_plan_cli.py -k "tpu or h100" -n 2  # The rest ran in make test.

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Rewrites every Python file in the project's layout (ruff.toml's [format]).
format: $(VENV)/.installed
	$(VENV)/bin/ruff format .

# A round of the default image model, then of the embedded-size Llama decoder (text), each way
# side by side (BENCHMARKS.md).
BENCH_OUT ?= benchmarks/round_speed.json
BENCH_FLAGS ?=
TEXT_BENCH_OUT ?= benchmarks/text_round_speed.json
TEXT_BENCH_FLAGS ?=
bench: $(VENV)/.installed
	$(PY) -m benchmarks.round_speed --out $(BENCH_OUT) $(BENCH_FLAGS)
	$(PY) -m benchmarks.text_round_speed --out $(TEXT_BENCH_OUT) $(TEXT_BENCH_FLAGS)

.PHONY: install run check-run test test-slow test-sweep test-all test-plan lint format bench
