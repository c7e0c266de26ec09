# know2vec-jax: `make demo` runs the main job, `make test` runs the tests. Both set themselves up
# (virtual environment, package, Debian's Fashion-MNIST package) on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ZOO    ?= artifacts/zoo-demo
STARTER ?= artifacts/zoo-starter
# pytest-xdist workers for `make test` (each with 8 forced CPU devices)
TEST_WORKERS ?= 2
# The tests' XLA: 8 forced CPU devices (the sharded paths run), and XLA:CPU's backend optimisation
# off: compiling is most of the suite's CPU time and the tests' arrays are small (tests/test_align.py
# took 76 CPU-s instead of 138). The main job and the benchmarks keep XLA's default.
TEST_XLA_FLAGS ?= --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0

.PHONY: setup data demo reproduce bench test clean

$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,plot]'
	touch $(STAMP)

data:
	@if [ -f $(FMNIST) ]; then \
	  echo "Fashion-MNIST: found in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST missing: install Debian's dataset-fashion-mnist, or put the four IDX" \
	       "*-ubyte.gz files in a directory and pass it as data_dir"; exit 1; \
	fi

setup: $(STAMP) data

# The main job: starter zoo (180 of the demo zoo's models) -> black-box knowledge -> backbone ->
# aligner -> index -> NNR table and the ranked models for one held-out query. Artifacts are cached
# under artifacts/.
demo: setup
	$(BIN)/know2vec zoo build --preset starter --zoo $(STARTER)
	$(BIN)/python -m experiments.nnr --quick --zoo $(STARTER)

# Every results table and figure of experiments/ (reusing cached artifacts when present; remove
# artifacts/ to start from scratch): NNR, SF-MTE, generalisation and open world (on the varied
# zoo: the demo zoo plus scikit-learn families), and retrieval latency against zoo size.
reproduce: setup
	$(BIN)/pip install -q -e '.[bench]'  # faiss-cpu and threadpoolctl: the latency figure's peers
	$(BIN)/know2vec zoo build --preset demo --zoo $(ZOO)
	$(BIN)/python -m experiments.nnr --zoo $(ZOO)
	$(BIN)/python -m experiments.sfmte --zoo $(ZOO)
	$(BIN)/know2vec zoo build --preset varied --zoo artifacts/zoo-varied
	$(BIN)/python -m experiments.generalise --zoo artifacts/zoo-varied
	$(BIN)/python -m experiments.openworld --zoo artifacts/zoo-varied
	$(BIN)/python -m experiments.latency

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks

test: setup
	XLA_FLAGS="$(TEST_XLA_FLAGS)" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	  --durations=15 tests

clean:
	rm -rf $(VENV) artifacts .pytest_cache
