# Two commands for a newcomer: `make demo` and `make test`. Both create the virtual
# environment in .venv on first use and install lowmag with every CPU-side extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowmag-installed

.PHONY: demo test test-all bench soak install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[edge,train,export,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	LOWMAG_BIN=$(BIN) bash demo/run.sh

# The default run: everything but `slow` and `benchmark` tests; `gpu` tests skip without CUDA.
test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m 'not benchmark'

# Micro-benchmarks of the hot paths (pytest-benchmark; about 2 min on 2 cores); never part
# of `make test`. Timings only, no asserts on them; the full numbers land in .bench/.
bench: $(STAMP)
	@mkdir -p .bench
	$(BIN)/python -m pytest tests/bench -m benchmark --benchmark-only --benchmark-min-rounds=3 \
		--benchmark-max-time=1.0 --benchmark-columns=min,median,mean,max,rounds \
		--benchmark-json=.bench/results.json

# The watcher's soak: 1,000 slides with hostile names, bad files, renames and replacements
# while the watcher is killed with SIGKILL at least 10 times (about 3 min on 2 cores).
soak: $(STAMP)
	$(BIN)/python tests/soak/soak.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .bench
