# real200: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run serve worker beat test lint format lock migrate messages

# The virtualenv with the locked dependencies (runtime and test tools). Re-run when the
# lock file changes.
install: $(VENV)/.installed
$(VENV)/.installed: requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.lock
	touch $@

migrate: install
	$(BIN)/python manage.py migrate --no-input -v0

# Embedded default (SQLite, in-process cache and tasks): installs, migrates, sets up the
# demo organization, prints the dashboard URL and a demo key, and serves on HOST:PORT.
run: migrate
	$(BIN)/python manage.py collectstatic --no-input -v0
	@demo=$$($(BIN)/python manage.py demo); \
	echo; \
	echo "  real200 is starting on http://$(HOST):$(PORT)/"; \
	echo "  dashboard: http://$(HOST):$(PORT)/"; \
	echo "  $$(echo "$$demo" | grep '^dashboard login')"; \
	echo "  API base URL: http://$(HOST):$(PORT)/v1"; \
	echo "  demo key: $$(echo "$$demo" | tail -n 1)"; \
	echo; \
	HTTPS=0 WEB_CONCURRENCY=1 HOST=$(HOST) PORT=$(PORT) exec platform/serve

# Production web server: honours DATABASE_URL, REDIS_URL, HOST, PORT, WEB_CONCURRENCY.
serve: install
	$(BIN)/python manage.py collectstatic --no-input -v0
	HOST=$(HOST) PORT=$(PORT) platform/serve

worker: install
	$(BIN)/celery -A config worker --loglevel INFO

beat: install
	$(BIN)/celery -A config beat --loglevel INFO --schedule var/celerybeat-schedule

# Uses DATABASE_URL and REDIS_URL when set; otherwise SQLite and local memory, skipping
# (with the reason) only the tests that need a real PostgreSQL or Redis.
# The browser tests (tests/e2e) run in a pytest process of their own: Playwright's sync API
# and pytest-asyncio cannot share one. They need PostgreSQL and /usr/bin/chromium and say so
# when they skip. Without pytest-asyncio, its two settings in pyproject.toml are unknown
# options there: that warning is expected and silenced.
test: install
	SECRET_KEY=$${SECRET_KEY:-insecure-test-only-key} $(BIN)/pytest -n $${TEST_WORKERS:-auto} $(PYTEST_ARGS)
	SECRET_KEY=$${SECRET_KEY:-insecure-test-only-key} $(BIN)/pytest -p no:asyncio \
		-W "ignore:Unknown config option:pytest.PytestConfigWarning" tests/e2e $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python manage.py makemigrations --check --dry-run

# Refresh the zh-Hans catalogue from the code, then compile it (the .mo is committed, so a
# newcomer needs no gettext).
messages: install
	$(BIN)/python manage.py makemessages -l zh_Hans --ignore=.venv --ignore=staticfiles
	$(BIN)/python manage.py compilemessages -l zh_Hans --ignore=.venv

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerate the lock files from pyproject.toml (needs `uv`: pip install uv).
lock:
	uv pip compile pyproject.toml -o requirements.lock --python-version 3.11 --no-header
	uv pip compile pyproject.toml --extra dev -o requirements-dev.lock --python-version 3.11 --no-header
