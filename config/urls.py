from django.contrib import admin
from django.urls import include, path

from apps.gateway.views import metrics_view
from config import health

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),
    path("v1/", include("apps.gateway.urls")),
    path("admin/", admin.site.urls),
    path("", include("apps.dashboard.urls")),
]
