"""Operators' view of API keys: read-only, with a revoke action. The key's hash is never
shown (nor, of course, the key: it exists only in the customer's hands)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from apps.keys.models import ApiKey
from apps.keys.services import key_revoke


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = (
        "display",
        "organization",
        "name",
        "created_at",
        "last_used_at",
        "expires_at",
        "is_revoked",
    )
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    list_select_related = ("organization",)
    search_fields = ("prefix", "name", "organization__slug")
    exclude = ("key_hash",)
    actions = ["revoke"]

    @admin.display(boolean=True, description=_("revoked"))
    def is_revoked(self, key: ApiKey) -> bool:
        return key.is_revoked

    @admin.action(description=_("Revoke the selected keys"), permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        keys = list(queryset.filter(revoked_at__isnull=True))
        for key in keys:
            key_revoke(key=key)
        self.message_user(
            request,
            ngettext("Revoked %d key.", "Revoked %d keys.", len(keys)) % len(keys),
            messages.SUCCESS,
        )

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("keys.change_apikey")

    # Keys are created where their clear text can be shown once (dashboard, create_key),
    # changed by their owners, and revoked rather than deleted: usage points at them.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False
