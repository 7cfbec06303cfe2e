# The two commands a newcomer needs:  make demo  and  make test  (each installs what it needs first).
SHELL := /bin/bash
PY := .venv/bin/python
# No hub is reachable; fail fast instead of retrying. Local Ray clusters run without token auth so the
# `ray` CLI and the drivers agree (see README, "Ray notes").
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_AUTH_MODE ?= disabled
export PYTHONUNBUFFERED := 1

.PHONY: setup demo ablations science test test-fast bench format clean

setup:
	@bash scripts/setup.sh

# The whole pipeline, one seed, on the tiny preset's shorter demo schedule (README, "make demo: ...").
demo: setup
	$(PY) jobs/demo.py --config configs/tiny-demo.yaml --out runs/demo

ablations: setup
	$(PY) jobs/demo.py --config configs/tiny-demo.yaml --out runs/demo --ablations

# Every stage over 3 seeds (worlds and training), with the stage-2 ablations: runs/science/report.md.
science: setup
	$(PY) jobs/science.py --config configs/tiny.yaml --out runs/science

# Lint and formatting are checked first: `make format` applies both.
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 $(PY) -m pytest -q --durations=40 tests

test-fast: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) bench/data_throughput.py

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf runs .pytest_cache
