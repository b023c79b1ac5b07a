# The README's two commands: `make demo` (the main job) and `make test`.
# Both run `setup` first, which installs everything a fresh host needs.
PY := .venv/bin/python
PKSTRACE := .venv/bin/pkstrace

.PHONY: setup demo test test-quick lint bench bench-smoke clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m ruff check pkstrace tests benchmarks
	$(PY) -m pytest -q --timeout=1200 tests

test-quick: setup
	$(PY) -m pytest -q -m "not emulated and not slow" tests

lint: setup
	$(PY) -m ruff check pkstrace tests benchmarks

bench: setup
	$(PY) benchmarks/run_all.py

bench-smoke: setup
	$(PY) benchmarks/run_all.py --smoke

clean:
	rm -rf .venv build *.egg-info .pytest_cache
