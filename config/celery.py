"""The Celery app. Tasks are found in each app's tasks.py; the schedule lives in settings.

In the embedded default (no REDIS_URL) tasks run in-process: `task_always_eager` is set on
the app itself, because overriding the Django setting later does not reach a configured app.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("real200")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
