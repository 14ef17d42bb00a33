# The two commands of the README. Each sets up what it needs (idempotent: scripts/setup.sh).
PY := .venv/bin/python

.PHONY: setup demo test lint wheel-check clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m paged_attention.lab.cli run smoke

test: setup lint
	$(PY) -m pytest -n 2 -q -rs

# Import contracts (pyproject.toml [tool.importlinter]): the runtime never imports the lab.
lint: setup
	@bash scripts/lint_imports.sh

# Build the wheel, install it in a fresh venv outside the checkout, decode on every backend x
# path and run the smoke experiment from there (README, "Install from a wheel").
wheel-check: setup
	@bash scripts/wheel_check.sh

clean:
	rm -rf .venv .pytest_cache build *.egg-info
