# The two commands of the README. Each one sets up .venv itself (scripts/bootstrap.sh).
.PHONY: demo test venv tools
venv:
	@scripts/bootstrap.sh
demo: venv
	.venv/bin/easgate demo $(DEMO_ARGS)
tools:
	@scripts/ensure_test_tools.sh
test: venv tools
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
