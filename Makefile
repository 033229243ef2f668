# Two commands on a fresh machine: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
WORKDIR ?= workdirs/default
# Tests run on 8 fake CPU devices so pmap and sharding are exercised for real.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
PYTEST_ARGS ?= -n 2

.PHONY: install install-test run test lock clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c requirements.lock -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -c requirements.lock -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Trains the default model (resuming if WORKDIR holds a checkpoint), evaluates it, samples.
run: install
	$(PY) run.py --config=configs/default.py --workdir=$(WORKDIR) --mode=train
	$(PY) run.py --config=configs/default.py --workdir=$(WORKDIR) --mode=eval
	$(PY) run.py --config=configs/default.py --workdir=$(WORKDIR) --mode=sample \
	  --prompt='def fibonacci(n):'

test: install-test
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

# Re-pins requirements.lock to what is installed now (after a deliberate upgrade).
lock:
	$(PY) -m pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
