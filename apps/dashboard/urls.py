from django.urls import include, path

from apps.dashboard import views

urlpatterns = [
    path("stripe/webhook", views.stripe_webhook_view, name="stripe-webhook"),
    # Accounts, organizations and members, keys, models and docs.
    path("", include("apps.dashboard.urls_people")),
    # Balance, top-ups and usage.
    path("", include("apps.dashboard.urls_money")),
]
