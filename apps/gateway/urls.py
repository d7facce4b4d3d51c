from django.urls import path, re_path

from apps.gateway import views

urlpatterns = [
    path("chat/completions", views.ChatCompletionsView.as_view(), name="chat-completions"),
    path("models", views.ModelListView.as_view(), name="models"),
    path("models/<path:model_id>", views.ModelDetailView.as_view(), name="model-detail"),
    re_path(r"^.*$", views.UnknownEndpointView.as_view(), name="unknown-endpoint"),
]
