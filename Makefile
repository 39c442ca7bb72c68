# `make test` and `make demo` each work alone on a fresh machine: they create
# the virtual environment (.venv) and install the package first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all demo install bench-peer clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The default suite (slow tests excluded); `make test-all` runs everything.
test: $(STAMP)
	$(PY) -m pytest -q -m 'not slow' -n 2 tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# The whole pipeline on the Essen folk melodies, CPU preset; finished stages are reused.
DEMO_DIR ?= workdir_demo
demo: $(STAMP)
	$(PY) -m diverse_cfg.main --stage=all --config=configs/essen.py:cpu \
	  --workdir=$(DEMO_DIR) --config.data.data_dir=$(DEMO_DIR)/data

# The peer benchmark of issue #8: our CFG sampler vs HF transformers' generate(guidance_scale)
# on the CPU build of torch; installs the `peer` extras (torch, transformers) first.
PEER_STAMP := $(VENV)/.installed-peer
$(PEER_STAMP): $(STAMP) setup.py
	$(PY) -m pip install --quiet -e '.[peer]'
	touch $(PEER_STAMP)

bench-peer: $(PEER_STAMP)
	$(PY) -m benchmarks.peer_transformers

clean:
	rm -rf $(VENV) *.egg-info
