"""Operators' view of users, organizations and memberships.

Tenancy knows nothing of money: the billing app re-registers Organization with its
balance and the "Adjust balance" form (apps/billing/admin.py).
"""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from apps.tenancy.models import Membership, Organization, User


class UserCreationForm(AdminUserCreationForm):
    class Meta:
        model = User
        fields = ("email",)


class UserEditForm(UserChangeForm):
    class Meta:
        model = User
        fields = "__all__"


class MembershipOfUserInline(admin.TabularInline):
    model = Membership
    fk_name = "user"
    fields = ("organization", "role", "created_at")
    readonly_fields = ("created_at",)
    raw_id_fields = ("organization",)
    extra = 0


class MembershipOfOrganizationInline(admin.TabularInline):
    model = Membership
    fk_name = "organization"
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)
    raw_id_fields = ("user",)
    extra = 0


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    """Django's user admin, for a user who signs in with an email address."""

    form = UserEditForm
    add_form = UserCreationForm
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        (_("Personal info"), {"fields": ("first_name", "last_name")}),
        (
            _("Permissions"),
            {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")},
        ),
        (_("Important dates"), {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = (
        (
            None,
            {
                "classes": ("wide",),
                "fields": ("email", "usable_password", "password1", "password2"),
            },
        ),
    )
    list_display = ("email", "first_name", "last_name", "is_staff", "is_active", "date_joined")
    search_fields = ("email", "first_name", "last_name")
    ordering = ("email",)
    inlines = [MembershipOfUserInline]

    def get_inline_instances(self, request: HttpRequest, obj: User | None = None) -> list:
        # The add page is Django's short one (email, password); memberships come after.
        return super().get_inline_instances(request, obj) if obj is not None else []


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    """Organizations are created with their owner (`create_org`, sign-up), never here, and
    never deleted: their keys, usage and books refer to them."""

    list_display = ("slug", "name", "is_personal", "created_at")
    list_filter = ("is_personal",)
    search_fields = ("slug", "name")
    readonly_fields = ("slug", "is_personal", "created_at")
    inlines = [MembershipOfOrganizationInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Organization | None = None) -> bool:
        return False
