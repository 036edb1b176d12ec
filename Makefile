# `make demo` and `make test` build their own environment from nothing.
# torch==2.13.0 goes in first and is then a constraint for everything else: an unpinned
# torch (asked for by any dependency) would pull a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench clean venv

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(VENV))/constraints.txt $(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/accelerate-dfkd recipes/digits/dfad.yaml --output_dir runs/digits_dfad --overwrite_output_dir true

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-all: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "" 

bench: $(STAMP)
	$(PY) benchmarks/dfad_throughput.py

clean:
	rm -rf $(VENV) runs
