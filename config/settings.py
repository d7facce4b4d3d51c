"""real200 settings: one module, driven by the environment (README lists every variable).

With neither DATABASE_URL nor REDIS_URL set, the embedded default runs everything on one
machine: SQLite, Django's local-memory cache, Celery tasks in-process. Production differs
from development only through the environment.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _

from config.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("REAL200_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", default=False)
DATABASE_URL = env_str("DATABASE_URL")
REDIS_URL = env_str("REDIS_URL")


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    if DATABASE_URL and not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DATABASE_URL is set")
    # Embedded default: a key made once per install, kept beside the SQLite database, so
    # sessions survive a restart without a newcomer having to invent a secret.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# HTTPS: on by default outside DEBUG. Turn off only where no TLS terminates in front of
# real200 (a laptop, a benchmark on loopback).
HTTPS = env_bool("HTTPS", default=not DEBUG)
SECURE_SSL_REDIRECT = HTTPS
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
if env_bool("TRUST_X_FORWARDED_PROTO", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "apps.tenancy",
    "apps.keys",
    "apps.catalog",
    "apps.billing",
    "apps.usage",
    "apps.gateway",
    "apps.dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "config.static.AsyncWhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
# The /v1 API is served by its own handler (config/asgi.py) with only this: it
# authenticates by key and answers in OpenAI's shapes, so sessions, languages, CSRF, users
# and messages would be pure cost there, each a pair of thread hops in an async stack.
API_MIDDLEWARE = ["config.middleware.InlineSecurityMiddleware"]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.i18n",
                "apps.dashboard.context.dashboard",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------
if DATABASE_URL:
    _db = dj_database_url.parse(DATABASE_URL)
    if _db["ENGINE"] == "django.db.backends.postgresql":
        # Under ASGI a pool is essential (STACK-NOTES: 2.7x a connection per request);
        # the pool is per process, so size it per worker.
        _db["CONN_MAX_AGE"] = 0
        _db.setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("DB_POOL_MIN", 2),
            "max_size": env_int("DB_POOL_MAX", 10),
            "timeout": env_float("DB_POOL_TIMEOUT", 10.0),
        }
        # A pooled connection can die with the server (restart, failover): Django then has
        # the pool check each one on the way out rather than fail the request that draws it.
        _db["CONN_HEALTH_CHECKS"] = True
    DATABASES = {"default": _db}
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "real200.sqlite3",
            "OPTIONS": {
                # IMMEDIATE takes the write lock when a transaction starts, so two holds
                # racing for the same balance queue up instead of failing with "database
                # is locked" halfway through.
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
if not DATABASE_URL:
    # SQLite cannot enforce the rollups' NULLS NOT DISTINCT uniqueness. The embedded
    # default runs one process and the rollup task replaces whole buckets, so nothing can
    # duplicate a rollup there; PostgreSQL enforces it in production.
    SILENCED_SYSTEM_CHECKS = ["models.W047"]

# The event loop's own connections, for the one-statement hold and settlement of each call
# (config/asyncdb.py), per worker process, beside the pool above (PostgreSQL only). A
# connection is in use until the loop gets round to its answer, which under a burst of
# new calls takes several passes of a busy loop: 10 ran dry when 1,000 streams opened
# within a second on two workers (bench "open"), 20 did not.
DB_ASYNC_POOL_MIN = env_int("DB_ASYNC_POOL_MIN", 1)
DB_ASYNC_POOL_MAX = env_int("DB_ASYNC_POOL_MAX", 20)
DB_ASYNC_POOL_TIMEOUT = env_float("DB_ASYNC_POOL_TIMEOUT", 10.0)

# --- Cache ----------------------------------------------------------------------------
# Connections per process to Redis, for each of its pools (the cache's, the limiter's):
# redis-py's default of 100 runs dry under a few hundred concurrent calls, and then every
# limit check would fail open.
REDIS_MAX_CONNECTIONS = env_int("REDIS_MAX_CONNECTIONS", 2000)
# Names in a Redis shared with others (tests give each parallel worker its own).
CACHE_KEY_PREFIX = env_str("CACHE_KEY_PREFIX", "real200")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "OPTIONS": {
                "SOCKET_CONNECT_TIMEOUT": 1,
                "SOCKET_TIMEOUT": 1,
                "CONNECTION_POOL_KWARGS": {"max_connections": REDIS_MAX_CONNECTIONS},
            },
            "KEY_PREFIX": CACHE_KEY_PREFIX,
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Celery ---------------------------------------------------------------------------
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL
# One queue name per deployment sharing a Redis (tests give each parallel worker its own).
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_QUEUE", "real200")
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"

# --- Auth -----------------------------------------------------------------------------
AUTH_USER_MODEL = "tenancy.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# --- I18n -----------------------------------------------------------------------------
LANGUAGE_CODE = "en"
LANGUAGES = [("en", _("English")), ("zh-hans", _("Simplified Chinese"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Static files ---------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard-home"
LOGOUT_REDIRECT_URL = "login"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if DEBUG:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}

# --- Email ----------------------------------------------------------------------------
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", default=False)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "real200 <noreply@localhost>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
ADMINS = [("operators", addr) for addr in env_list("OPERATOR_EMAILS", [])]

# --- Logging --------------------------------------------------------------------------
LOGGING = {
    "version": 1,
    # Keep Celery's and uvicorn's own loggers alive.
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        # Errors in async views are invisible with DEBUG off unless this logger is set.
        "django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False},
        # One INFO line per upstream request is noise at this volume, and costs CPU.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}

# --- Gateway --------------------------------------------------------------------------
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 10 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_MAX_BODY_BYTES
GATEWAY_CONNECT_TIMEOUT = env_float("GATEWAY_CONNECT_TIMEOUT", 5.0)
# A call may run this long in all; its hold lives a little longer, so the books task
# never releases the hold of a call that is still running.
GATEWAY_MAX_CALL_SECONDS = env_int("GATEWAY_MAX_CALL_SECONDS", 600)
GATEWAY_HOLD_SECONDS = GATEWAY_MAX_CALL_SECONDS + 300
# With no max_tokens, a call goes ahead only if the balance affords the prompt and at
# least this many output tokens.
GATEWAY_MIN_REPLY_TOKENS = env_int("GATEWAY_MIN_REPLY_TOKENS", 16)
# Unknown API keys one client address may send in a minute before its keys are no longer
# looked up in the database (429 until the minute ends; cached keys still pass).
GATEWAY_UNKNOWN_KEYS_PER_MINUTE = env_int("GATEWAY_UNKNOWN_KEYS_PER_MINUTE", 30)
GATEWAY_UPSTREAM_CONNECTIONS = env_int("GATEWAY_UPSTREAM_CONNECTIONS", 2000)
# Rate limits: every organization's keys together may make ORG_DEFAULT_RPM requests a
# minute unless the organization has its own limit; a key without its own tokens-per-minute
# limit is counted against KEY_DEFAULT_TPM.
ORG_DEFAULT_RPM = env_int("ORG_DEFAULT_RPM", 3000)
KEY_DEFAULT_TPM = env_int("KEY_DEFAULT_TPM", 10_000_000)
# While a counter is below half its limit, each process reserves 1/RATE_LIMIT_SHARES of the
# limit at a time and admits calls from it in memory (apps/keys/limits.py, allowances);
# 0: every call is counted in Redis as it comes.
RATE_LIMIT_SHARES = env_int("RATE_LIMIT_SHARES", 20)

# Behind a reverse proxy, the client address is the last hop this proxy added to
# X-Forwarded-For; only then is that header believed.
TRUSTED_PROXIES = env_list("TRUSTED_PROXIES", [])

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
}

# --- Stripe ---------------------------------------------------------------------------
# Card top-ups through Stripe Checkout; without STRIPE_SECRET_KEY they are turned off.
# Amounts are USD text, parsed by apps.billing.money.parse_usd (never a float).
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY")
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET")
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "https://api.stripe.com")
TOPUP_MIN_USD = env_str("TOPUP_MIN_USD", "5.00")
TOPUP_MAX_USD = env_str("TOPUP_MAX_USD", "10000.00")
