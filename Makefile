# Two commands: `make run` (demo proxy on a SoftHSMv2 token) and `make test` (everything).
DEMO_DIR ?= demo
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test bootstrap lint typecheck unit clean

bootstrap:
	@./scripts/bootstrap.sh

run: bootstrap
	.venv/bin/xks-proxy demo --dir $(DEMO_DIR) --host $(HOST) --port $(PORT) $(DEMO_ARGS)

lint: bootstrap
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench

typecheck: bootstrap
	.venv/bin/mypy

test: lint typecheck
	.venv/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache .hypothesis
