# callscribe — `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HASH   := $(shell cat pyproject.toml | sha256sum | cut -c1-12)
STAMP  := $(VENV)/.installed-$(HASH)
# `make demo` installs only what running needs (no [test] extra); `make install` adds the rest.
RUN_STAMP := $(VENV)/.runtime-$(HASH)
PYTEST_ARGS ?=
REDIS_PORT ?= 6379

.PHONY: install demo test test-fast test-vllm lint format redis system-deps bench fuzz soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# PYTHONWARNINGS: setuptools boxes every editable install with a warning about same-named
# folders, which is no news here.
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	test -e $(STAMP) || PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e .
	rm -f $(VENV)/.runtime-* && touch $@

redis:
	@REDIS_PORT=$(REDIS_PORT) scripts/ensure-redis.sh

system-deps:
	@scripts/system-deps.sh

# The demo call ships inside the package (callscribe/data/): no ../shared needed.
demo: $(RUN_STAMP) redis
	$(BIN)/callscribe demo --redis-url redis://127.0.0.1:$(REDIS_PORT)/0

lint: install
	$(BIN)/ruff check callscribe tests bench fuzz examples
	$(BIN)/ruff format --check callscribe tests bench fuzz examples
	$(BIN)/mypy callscribe

format: install
	$(BIN)/ruff format callscribe tests bench fuzz examples
	$(BIN)/ruff check --fix callscribe tests bench fuzz examples

# The whole suite: lint, unit and integration tests in .venv (3 workers, one test file per
# worker at a time: most tests wait on audio paced in real time), then the lab (real PBX and
# peers) and the real-vLLM tests, each failing when any of its tests is skipped.
# pytest exiting 5 (no tests ran) fails the target.
test: install system-deps redis lint
	$(BIN)/pytest -q -p no:cacheprovider -n 3 --dist loadfile --durations=25 $(PYTEST_ARGS) tests
	scripts/test-lab.sh
	scripts/test-vllm.sh

# Unit tests only: no Redis, no server. The unreachable Redis URL makes any test that tries
# to use one fail at once instead of quietly using a local Redis.
test-fast: install
	CALLSCRIBE_REDIS_URL=redis://127.0.0.1:1/0 $(BIN)/pytest -q -p no:cacheprovider tests/unit

test-vllm: install redis
	scripts/test-vllm.sh

bench: install redis
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/publish.py

fuzz: install
	fuzz/run.sh 60

soak: install redis
	$(BIN)/python bench/soak.py --find-max
	$(BIN)/python bench/soak.py --legs 1 --seconds 1800

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache test-output

# Real peers (tests/lab): Asterisk built from ../shared/vendor (cached) and the other lab peers.
.PHONY: test-lab
test-lab: install system-deps redis
	scripts/test-lab.sh
