# Two commands a newcomer runs: `make profile` and `make test`. Each creates or refreshes the project-local
# virtual environment (.venv) first, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE_OUT ?= profile_out

.PHONY: setup setup-openflamingo setup-transformers5 test test-openflamingo test-fast profile bench lint compile-report clean

# On a machine without a CUDA GPU torch must be the CPU build: torch==2.13.0 installs from local disk here,
# while a bare `torch` would pull a multi-GB CUDA build. With a GPU, the normal (CUDA) build, which brings
# the triton it pins; on the CPU triton comes from setup.py's range.
$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=64" wheel
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; \
	else \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The OpenFlamingo comparison environment: a separate venv, because open-flamingo needs torchvision (through
# open_clip) and the torchvision that matches .venv's CPU torch does not import. See requirements-openflamingo.txt.
OF_VENV ?= .venv-openflamingo
OF_PY := $(OF_VENV)/bin/python
OF_STAMP := $(OF_VENV)/.installed

$(OF_STAMP): requirements-openflamingo.txt setup.py
	test -x $(OF_PY) || python3 -m venv $(OF_VENV)
	$(OF_PY) -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(OF_PY) -m pip install -q -r requirements-openflamingo.txt
	$(OF_PY) -m pip install -q --no-deps open-flamingo==2.0.1
	$(OF_PY) -m pip install -q --no-deps -e .
	touch $(OF_STAMP)

setup-openflamingo: $(OF_STAMP)

# transformers 5.x beside 4.57 (.venv-openflamingo), for bench/idefics_cpu.py only (not CI): the CPU torch 2.13,
# no torchvision (its 2.13 match does not import beside the CPU build; IdeficsImageProcessor falls back to PIL).
T5_VENV ?= .venv-transformers5
T5_PY := $(T5_VENV)/bin/python
T5_STAMP := $(T5_VENV)/.installed

$(T5_STAMP): setup.py
	test -x $(T5_PY) || python3 -m venv $(T5_VENV)
	$(T5_PY) -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(T5_PY) -m pip install -q torch==2.13.0 transformers==5.24.0 pillow pytest "triton>=3.0,<4" numpy safetensors
	$(T5_PY) -m pip install -q --no-deps -e .
	touch $(T5_STAMP)

setup-transformers5: $(T5_STAMP)

# Tests run with one torch thread (tests/conftest.py) and one OpenMP thread: two threads on two shared cores
# stall whenever another process holds a core. Two pytest workers (pytest-xdist) keep both cores busy instead.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
WORKERS ?= 2

# The two environments build at once (-j): 77 s instead of 206 s one after the other (measured under load).
test:
	$(MAKE) -j2 $(STAMP) $(OF_STAMP)
	$(PY) -m ruff check .
	$(TEST_ENV) $(PY) -m pytest -q -n $(WORKERS) tests
	$(MAKE) test-openflamingo

# FastFlamingo against the real open_flamingo package and transformers' IDEFICS (tiny random models built from
# configs; no downloads).
test-openflamingo: $(OF_STAMP)
	$(TEST_ENV) $(OF_PY) -m pytest -q -n $(WORKERS) tests/test_openflamingo.py tests/test_idefics.py

# Skips the interpreter-heavy kernel tests: for a quick loop while editing.
test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(WORKERS) -m "not interpreter" tests

profile: $(STAMP)
	$(PY) -m flamingo_fast profile --preset small --shots 0,1,2,4,8,16,32 --impl reference,fast \
		--new-tokens 16 --repeats 3 --warmup 1 --json $(PROFILE_OUT)/profile.json \
		--csv $(PROFILE_OUT)/profile.csv --plot $(PROFILE_OUT)/profile.png

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

compile-report: $(STAMP)
	$(PY) bench/compile_report.py --out bench/compile_report.md

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(OF_VENV) $(T5_VENV) build *.egg-info .pytest_cache .ruff_cache $(PROFILE_OUT)
