"""Load-test and benchmark helpers (mock vLLM backend, load generators)."""
