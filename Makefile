# The two commands of the README. Each one sets up .venv itself (scripts/bootstrap.sh).
.PHONY: demo test venv tools lint
venv:
	@scripts/bootstrap.sh
demo: venv
	.venv/bin/easgate demo $(DEMO_ARGS)
tools:
	@scripts/ensure_test_tools.sh
# The layout rules (docs/architecture.md): lint, the dependency direction, types of core and authz.
lint: venv
	.venv/bin/ruff check addons tests scripts bench
	cd addons && ../.venv/bin/lint-imports --config ../.importlinter
	cd addons && ../.venv/bin/mypy --config-file ../pyproject.toml -p easgate.core -p easgate.authz
# 4 test processes on the 2-core reference machine: half of a test's time is waiting on the real
# processes and servers it started, which another test process uses (2:40 against 3:27 with -n 2).
test: venv tools lint
	.venv/bin/python -m pytest -q -n 4 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)
