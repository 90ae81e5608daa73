# Two commands: `make run` (demo proxy on a SoftHSMv2 token) and `make test` (everything).
DEMO_DIR ?= demo
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test bootstrap bootstrap-tests lint typecheck unit clean fleet-test

bootstrap:
	@./scripts/bootstrap.sh

bootstrap-tests:
	@./scripts/bootstrap.sh --for-tests

run: bootstrap
	.venv/bin/xks-proxy demo --dir $(DEMO_DIR) --host $(HOST) --port $(PORT) $(DEMO_ARGS)

lint: bootstrap-tests
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench

typecheck: bootstrap-tests
	.venv/bin/mypy

test: lint typecheck
	.venv/bin/pytest $(PYTEST_ARGS)

# The fleet test alone (part of `make test` too), printing its report: 3 proxies behind
# HAProxy under load, one SIGTERMed and restarted, one SIGKILLed.
fleet-test: bootstrap-tests
	.venv/bin/pytest tests/e2e/test_fleet.py -rP $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache .hypothesis
