# livepatch: `make demo` and `make test` are the two commands a fresh clone needs.
PYTHONS ?= 3.11 3.12 3.13
PYTEST_ARGS ?=

.PHONY: test demo venv lint bench clean

# .venv is the default (3.11) environment; .venv-3.12 and .venv-3.13 sit beside it.
venv: .venv/.installed

.venv/.installed: pyproject.toml
	@py=$$(.ci/find-python 3.11) || { echo "python3.11 not found"; exit 1; }; \
	scripts/make-venv "$$py" .venv
	@touch $@

test: venv
	@set -e; status=0; \
	echo "== ruff"; .venv/bin/ruff check; \
	for v in $(PYTHONS); do \
	  py=$$(.ci/find-python $$v) || { echo "== python$$v: not installed, skipped"; continue; }; \
	  if [ "$$v" = 3.11 ]; then env=.venv; else env=.venv-$$v; fi; \
	  scripts/make-venv "$$py" "$$env"; \
	  echo "== python$$v: mypy"; \
	  $$env/bin/mypy --python-version $$v || status=1; \
	  echo "== python$$v: pytest"; \
	  $$env/bin/python -m pytest -q $(PYTEST_ARGS) || status=1; \
	done; \
	exit $$status

demo: venv
	.venv/bin/python -m livepatch.demo

# benchmarks print ratios measured side by side in one run; README lists their figures
bench: venv
	@for b in benchmarks/bench_*.py; do echo "== $$b"; .venv/bin/python $$b || exit 1; done

clean:
	rm -rf .venv .venv-3.* build dist src/*.egg-info .mypy_cache .pytest_cache .ruff_cache
