# The two commands a fresh machine needs. Both do all set-up first (scripts/setup.sh).
.PHONY: setup serve test test-fast

setup:
	bash scripts/setup.sh

## Serve ponder on http://127.0.0.1:8000 in front of the embedded vLLM CPU engine
## (or the vLLM servers in PONDER_BACKEND_URLS).
serve: setup
	.venv/bin/ponder serve

## All tests, against the real vLLM CPU engine and a real Redis.
test: setup
	bash scripts/ensure_redis.sh
	.venv/bin/python -m pytest -q -rs

## Tests that need no engine (strategy logic, backend, cache, API over scripted backends).
test-fast:
	bash scripts/ensure_redis.sh
	.venv/bin/python -m pytest -q -m "not engine"
