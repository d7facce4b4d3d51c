"""The Celery app and its schedule. Tasks live in each app's tasks.py.

In the embedded default (no REDIS_URL) tasks run in-process: `task_always_eager` comes
from settings when the app is configured (CELERY_TASK_ALWAYS_EAGER), never toggled later.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.schedules import crontab

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("real200")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

app.conf.beat_schedule = {
    # Every minute: free the holds of calls whose process died before settling.
    "release-stale-holds": {"task": "apps.billing.tasks.release_stale_holds", "schedule": 60.0},
    # Every minute: email owners whose balance just fell below their alert threshold.
    "low-balance-alerts": {"task": "apps.billing.tasks.send_low_balance_alerts", "schedule": 60.0},
    # Every five minutes: refresh the last two hours of usage rollups for the charts.
    "rollup-usage": {"task": "apps.usage.tasks.rollup_usage", "schedule": 300.0},
    # Just after midnight UTC: recompute all of yesterday's rollups once more.
    "rollup-usage-yesterday": {
        "task": "apps.usage.tasks.rollup_usage",
        "schedule": crontab(hour=0, minute=10),
        "kwargs": {"hours": 26},
    },
    # Every hour at minute 7: reconcile the books and alert on any difference.
    "reconcile-books": {"task": "apps.usage.tasks.reconcile_books", "schedule": crontab(minute=7)},
}
