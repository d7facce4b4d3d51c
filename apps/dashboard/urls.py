from django.urls import path

from apps.dashboard import views

urlpatterns = [
    path("billing/redeem", views.redeem_view, name="billing-redeem"),
    path("billing/checkout", views.checkout_view, name="billing-checkout"),
    path("stripe/webhook", views.stripe_webhook_view, name="stripe-webhook"),
]
