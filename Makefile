# The two commands of the README. Each one sets up .venv itself (scripts/bootstrap.sh).
.PHONY: demo test venv
venv:
	@scripts/bootstrap.sh
demo: venv
	.venv/bin/easgate demo $(DEMO_ARGS)
test: venv
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
