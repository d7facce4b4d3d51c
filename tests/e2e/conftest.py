"""End-to-end tests in a real headless Chromium (Playwright's sync API with Debian's
`chromium`) against real200 served by uvicorn in a thread of the test process.

Run them in their own pytest process, without pytest-asyncio (Playwright's sync API runs
an event loop of its own, which pytest-asyncio's would collide with), on PostgreSQL:

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/real200 REDIS_URL=redis://127.0.0.1:6379/0 \\
        SECRET_KEY=t .venv/bin/pytest -p no:asyncio tests/e2e

They skip, saying why, when /usr/bin/chromium is missing, when pytest-asyncio is loaded
(the ordinary test run), or without PostgreSQL. Screenshots of each page go to
test-artifacts/e2e/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.test import override_settings

from tests.fakes.upstreams import OpenAIFake
from tests.servers import ROOT, asgi_in_thread

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts" / "e2e"


def pytest_collection_modifyitems(config, items) -> None:
    reason = None
    if config.pluginmanager.hasplugin("asyncio"):
        reason = "browser tests run in their own process: pytest -p no:asyncio tests/e2e"
    elif not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM}: apt-get install chromium"
    elif not django_settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        reason = "needs PostgreSQL: set DATABASE_URL=postgres://…"
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.path.is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _orm_beside_playwright() -> Iterator[None]:
    """Playwright's sync API keeps its event loop running in this thread while the test's
    own code runs, so Django would take every ORM call of the test for one made inside
    async code and refuse it; they are plain blocking calls between browser steps. Only
    for these tests: elsewhere the check catches real mistakes."""
    before = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if before is None:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = before


@pytest.fixture(scope="session")
def real200(tmp_path_factory) -> Iterator[str]:
    """real200 as production serves it: the ASGI app under uvicorn, its static files
    collected (hashed and compressed) and served by WhiteNoise. Plain HTTP on loopback,
    so the cookies are not marked Secure."""
    static_root = tmp_path_factory.mktemp("static")
    with override_settings(
        STATIC_ROOT=static_root,
        SESSION_COOKIE_SECURE=False,
        CSRF_COOKIE_SECURE=False,
        SECURE_SSL_REDIRECT=False,
    ):
        call_command("collectstatic", interactive=False, verbosity=0)
        # Built here, not imported at the top: WhiteNoise reads STATIC_ROOT when the
        # application loads its middleware, and config.asgi builds it on import.
        import importlib

        import config.asgi

        application = importlib.reload(config.asgi).application
        with asgi_in_thread(application, name="real200-e2e") as url:
            yield url


@pytest.fixture(scope="session")
def upstream() -> Iterator[OpenAIFake]:
    with OpenAIFake() as fake:
        yield fake


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser profile per test, at a phone-friendly width that still shows the
    tables whole."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    context.close()


@pytest.fixture
def shoot():
    """`shoot(page, "01-signup")` saves a screenshot of the whole page under
    test-artifacts/e2e/ (`full_page=False`: of what the window shows)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def save(page, name: str, *, full_page: bool = True) -> Path:
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path

    return save
