"""Operators' view of the books.

The ledger, holds, accounts, checkouts and reconciliation reports are read-only: money
moves only through services. Two forms move it on purpose, each through its service:
"Adjust balance" on an organization (`balance_adjust`) and minting a batch of codes
(`code_mint`), whose clear text is shown once, on the page that minted them.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from apps.billing.adjustments import (
    REASON_MAX_LENGTH,
    AdjustmentError,
    AdjustmentKind,
    Direction,
    balance_adjust,
)
from apps.billing.models import (
    Account,
    Hold,
    ReconciliationReport,
    RedemptionCode,
    StripeCheckout,
    Transfer,
)
from apps.billing.money import MoneyError, format_usd, parse_usd
from apps.billing.services import InsufficientFunds
from apps.billing.topups import CODE_MINT_MAX, TopupError, code_mint
from apps.tenancy.admin import OrganizationAdmin
from apps.tenancy.models import Organization

# Who may move money from the admin: those who may post ledger transfers (superusers, or
# staff given billing.add_transfer), although the ledger itself has no add form.
ADJUST_PERMISSION = "billing.add_transfer"


def _usd(nano: int | None) -> str:
    return "" if nano is None else format_usd(nano)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Viewable by staff with the view permission; no one adds, changes or deletes."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _usd_field(label: str) -> forms.CharField:
    return forms.CharField(label=label, max_length=32, help_text=gettext_lazy("USD, e.g. 25.00"))


def _clean_usd(text: str) -> int:
    try:
        return parse_usd(text, allow_zero=False)
    except MoneyError as exc:
        raise forms.ValidationError(str(exc)) from None


# --- Organizations, with their balance ----------------------------------------------------


class BalanceAdjustForm(forms.Form):
    direction = forms.ChoiceField(label=gettext_lazy("Direction"), choices=Direction.choices)
    kind = forms.ChoiceField(label=gettext_lazy("Kind"), choices=AdjustmentKind.choices)
    amount = _usd_field(gettext_lazy("Amount"))
    reason = forms.CharField(
        label=gettext_lazy("Reason"),
        max_length=REASON_MAX_LENGTH,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text=gettext_lazy("Kept on the ledger transfer, with your name."),
    )
    # One per rendering of the form: submitting it twice posts one transfer.
    token = forms.UUIDField(widget=forms.HiddenInput, initial=uuid.uuid4)

    def clean_amount(self) -> int:
        return _clean_usd(self.cleaned_data["amount"])


admin.site.unregister(Organization)


@admin.register(Organization)
class OrganizationBillingAdmin(OrganizationAdmin):
    """The tenancy app's organization admin, with the balance and "Adjust balance"."""

    list_display = (*OrganizationAdmin.list_display, "available_usd", "held_usd")
    readonly_fields = (*OrganizationAdmin.readonly_fields, "balance")
    actions = ["adjust_balance"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Organization]:
        return super().get_queryset(request).select_related("account")

    def get_urls(self) -> list:
        adjust = path(
            "<path:object_id>/adjust/",
            self.admin_site.admin_view(self.adjust_view),
            name="tenancy_organization_adjust",
        )
        return [adjust, *super().get_urls()]

    @staticmethod
    def _account(organization: Organization) -> Account | None:
        try:
            return organization.account
        except Account.DoesNotExist:
            return None

    @admin.display(description=gettext_lazy("available, USD"))
    def available_usd(self, organization: Organization) -> str:
        account = self._account(organization)
        return format_usd(account.available_nano if account else 0)

    @admin.display(description=gettext_lazy("held, USD"))
    def held_usd(self, organization: Organization) -> str:
        account = self._account(organization)
        return format_usd(account.held_nano if account else 0)

    @admin.display(description=gettext_lazy("balance"))
    def balance(self, organization: Organization) -> str:
        url = reverse("admin:tenancy_organization_adjust", args=[organization.pk])
        return format_html(
            '{} USD available, {} USD held · <a href="{}">{}</a>',
            self.available_usd(organization),
            self.held_usd(organization),
            url,
            _("Adjust balance"),
        )

    @admin.action(description=gettext_lazy("Adjust balance"), permissions=["adjust"])
    def adjust_balance(
        self, request: HttpRequest, queryset: QuerySet[Organization]
    ) -> HttpResponse | None:
        organizations = list(queryset[:2])
        if len(organizations) != 1:
            self.message_user(request, _("Adjust one organization at a time."), messages.WARNING)
            return None
        url = reverse("admin:tenancy_organization_adjust", args=[organizations[0].pk])
        return HttpResponseRedirect(url)

    def has_adjust_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(ADJUST_PERMISSION)

    def adjust_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if not self.has_adjust_permission(request):
            raise PermissionDenied
        organization = get_object_or_404(Organization, pk=object_id)
        form = BalanceAdjustForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                transfer = balance_adjust(
                    organization=organization,
                    amount_nano=data["amount"],
                    direction=data["direction"],
                    kind=data["kind"],
                    reason=data["reason"],
                    staff_user=request.user,
                    idempotency_key=f"adjust:{data['token']}",
                )
            except InsufficientFunds as exc:
                form.add_error(
                    "amount",
                    _("The balance affords %(available)s USD: a debit may not take it below zero.")
                    % {"available": format_usd(exc.available_nano)},
                )
            except AdjustmentError as exc:
                form.add_error(None, str(exc))
            else:
                self.message_user(
                    request,
                    _("Posted transfer #%(id)s: %(kind)s %(direction)s, %(amount)s USD.")
                    % {
                        "id": transfer.pk,
                        "kind": data["kind"],
                        "direction": data["direction"],
                        "amount": format_usd(transfer.amount_nano),
                    },
                    messages.SUCCESS,
                )
                return HttpResponseRedirect(
                    reverse("admin:tenancy_organization_change", args=[organization.pk])
                )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": _("Adjust the balance of %(org)s") % {"org": organization},
            "organization": organization,
            "available": self.available_usd(organization),
            "form": form,
        }
        return TemplateResponse(request, "admin/billing/organization_adjust.html", context)


# --- The books, read-only -------------------------------------------------------------


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "kind", "balance_usd", "held_usd", "available_usd")
    list_filter = ("kind",)
    list_select_related = ("organization",)
    search_fields = ("organization__slug",)

    @admin.display(description=gettext_lazy("balance, USD"))
    def balance_usd(self, account: Account) -> str:
        return format_usd(account.balance_nano)

    @admin.display(description=gettext_lazy("held, USD"))
    def held_usd(self, account: Account) -> str:
        return format_usd(account.held_nano)

    @admin.display(description=gettext_lazy("available, USD"))
    def available_usd(self, account: Account) -> str:
        return format_usd(account.available_nano)


@admin.register(Transfer)
class TransferAdmin(ReadOnlyAdmin):
    """The ledger: inserted by services only, never edited, never deleted."""

    list_display = (
        "id",
        "created_at",
        "kind",
        "amount_usd",
        "from_account",
        "to_account",
        "created_by",
        "memo",
    )
    list_filter = ("kind",)
    list_select_related = ("from_account__organization", "to_account__organization", "created_by")
    search_fields = ("idempotency_key", "memo", "=id")
    date_hierarchy = "created_at"

    @admin.display(description=gettext_lazy("amount, USD"))
    def amount_usd(self, transfer: Transfer) -> str:
        return format_usd(transfer.amount_nano)


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = ("request_id", "account", "amount_usd", "status", "created_at", "expires_at")
    list_filter = ("status",)
    list_select_related = ("account__organization",)
    search_fields = ("request_id",)

    @admin.display(description=gettext_lazy("amount, USD"))
    def amount_usd(self, hold: Hold) -> str:
        return format_usd(hold.amount_nano)


@admin.register(ReconciliationReport)
class ReconciliationReportAdmin(ReadOnlyAdmin):
    list_display = ("finished_at", "is_clean", "accounts", "transfers", "usage_records")
    list_filter = ("is_clean",)


@admin.register(StripeCheckout)
class StripeCheckoutAdmin(ReadOnlyAdmin):
    list_display = ("session_id", "organization", "amount_usd", "status", "created_at")
    list_filter = ("status",)
    list_select_related = ("organization",)
    search_fields = ("session_id", "organization__slug")

    @admin.display(description=gettext_lazy("amount, USD"))
    def amount_usd(self, checkout: StripeCheckout) -> str:
        return format_usd(checkout.amount_nano)


# --- Redemption codes -----------------------------------------------------------------


class CodeMintForm(forms.Form):
    amount = _usd_field(gettext_lazy("Amount per code"))
    count = forms.IntegerField(label=gettext_lazy("Codes"), min_value=1, max_value=CODE_MINT_MAX)
    batch = forms.CharField(label=gettext_lazy("Batch"), max_length=100, required=False)
    expires_in_days = forms.IntegerField(
        label=gettext_lazy("Expires in (days)"), min_value=1, required=False
    )

    def clean_amount(self) -> int:
        return _clean_usd(self.cleaned_data["amount"])


@admin.register(RedemptionCode)
class RedemptionCodeAdmin(ReadOnlyAdmin):
    """Codes are listed by their last four characters; the clear text of a code exists
    only on the page that minted it (the "add" page here) and in its holder's hands."""

    list_display = (
        "display",
        "batch",
        "amount_usd",
        "created_at",
        "expires_at",
        "redeemed_by_organization",
        "redeemed_by_user",
        "redeemed_at",
    )
    list_filter = (("redeemed_at", admin.EmptyFieldListFilter), "created_at")
    list_select_related = ("redeemed_by_organization", "redeemed_by_user")
    search_fields = ("batch", "last_four")
    exclude = ("code_hash",)

    @admin.display(description=gettext_lazy("code"))
    def display(self, code: RedemptionCode) -> str:
        return f"R200-…{code.last_four}"

    @admin.display(description=gettext_lazy("amount, USD"))
    def amount_usd(self, code: RedemptionCode) -> str:
        return format_usd(code.amount_nano)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("billing.add_redemptioncode")

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        """Mint a batch (`code_mint`) and show its codes, once."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = CodeMintForm(request.POST or None)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": _("Mint redemption codes"),
            "form": form,
        }
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            days = data["expires_in_days"]
            try:
                codes = code_mint(
                    amount_nano=data["amount"],
                    count=data["count"],
                    batch=data["batch"],
                    created_by=request.user,
                    expires_at=timezone.now() + timedelta(days=days) if days else None,
                )
            except TopupError as exc:
                form.add_error(None, str(exc))
            else:
                context.update(
                    title=_("Minted %(count)d codes") % {"count": len(codes)},
                    codes=codes,
                    amount=format_usd(data["amount"]),
                    batch=data["batch"],
                )
                response = TemplateResponse(
                    request, "admin/billing/redemptioncode_minted.html", context
                )
                response["Cache-Control"] = "no-store"  # the codes are shown once
                return response
        return TemplateResponse(request, "admin/billing/redemptioncode_mint.html", context)
