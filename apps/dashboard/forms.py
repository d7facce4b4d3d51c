"""The dashboard's forms: they parse and check what people type; services decide."""

from __future__ import annotations

from datetime import datetime, timedelta

from django import forms
from django.contrib.auth import password_validation
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from apps.billing.money import MoneyError, format_usd, parse_usd
from apps.keys.models import ApiKey, BudgetPeriod
from apps.tenancy.models import Role, User

MAX_EXPIRY_DAYS = 3650


class SignUpForm(forms.Form):
    email = forms.EmailField(
        label=_("Email address"),
        widget=forms.EmailInput(attrs={"autocomplete": "email", "autofocus": True}),
    )
    password = forms.CharField(
        label=_("Password"),
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text=_("At least 8 characters; not only digits, not a common password."),
    )

    def clean_email(self) -> str:
        email = User.objects.normalize_email(self.cleaned_data["email"]).lower()
        if User.objects.filter(email=email).exists():
            raise forms.ValidationError(_("An account with this email address already exists."))
        return email

    def clean(self) -> dict:
        cleaned = super().clean()
        if cleaned.get("password") and cleaned.get("email"):
            try:
                password_validation.validate_password(
                    cleaned["password"], User(email=cleaned["email"])
                )
            except forms.ValidationError as error:
                self.add_error("password", error)
        return cleaned


class OrganizationForm(forms.Form):
    name = forms.CharField(label=_("Name"), max_length=200)
    slug = forms.SlugField(
        label=_("Address"),
        max_length=64,
        required=False,
        help_text=_(
            "Lowercase letters, digits and hyphens, used in page addresses. "
            "Leave empty to make one from the name."
        ),
    )


class InvitationForm(forms.Form):
    email = forms.EmailField(label=_("Email address"))
    role = forms.ChoiceField(label=_("Role"), choices=Role.choices, initial=Role.DEVELOPER)


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(label=_("Role"), choices=Role.choices)


def _lines(text: str) -> list[str]:
    """Entries separated by new lines, commas or spaces."""
    return [part for part in text.replace(",", " ").split() if part]


def _usd_exact(nano: int) -> str:
    """An amount as people type it, with every digit it has: 25.00, 0.125."""
    whole, frac = format_usd(nano).split(".")
    return f"{whole}.{frac.rstrip('0').ljust(2, '0')}"


class KeyPolicyForm(forms.Form):
    """Name and policy of a new key; `key_kwargs()` gives what `key_create` takes."""

    name = forms.CharField(label=_("Name"), max_length=100, required=False)
    allowed_models = forms.MultipleChoiceField(
        label=_("Models"),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text=_("None selected: every model."),
    )
    rpm = forms.IntegerField(
        label=_("Requests per minute"),
        min_value=1,
        required=False,
        help_text=_("Empty: no limit of its own."),
    )
    tpm = forms.IntegerField(
        label=_("Tokens per minute"),
        min_value=1,
        required=False,
        help_text=_("Empty: no limit of its own."),
    )
    budget = forms.CharField(
        label=_("Budget (USD)"),
        required=False,
        help_text=_("Empty: no budget. For example 25.00"),
        widget=forms.TextInput(attrs={"inputmode": "decimal"}),
    )
    budget_period = forms.ChoiceField(
        label=_("Budget period"), choices=BudgetPeriod.choices, initial=BudgetPeriod.MONTHLY
    )
    expires_in_days = forms.IntegerField(
        label=_("Expires in (days)"),
        min_value=1,
        max_value=MAX_EXPIRY_DAYS,
        required=False,
        help_text=_("Empty: never expires."),
    )
    allowed_ips = forms.CharField(
        label=_("Allowed IP addresses"),
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text=_("One address or CIDR range per line, e.g. 203.0.113.0/24. Empty: any address."),
    )

    def __init__(self, *args, model_names: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["allowed_models"].choices = [(name, name) for name in sorted(model_names)]

    def clean_budget(self) -> int | None:
        text = self.cleaned_data["budget"].strip().removeprefix("$")
        if not text:
            return None
        try:
            return parse_usd(text)
        except MoneyError:
            raise forms.ValidationError(_("Enter an amount in USD, like 25.00.")) from None

    def expires_at(self) -> datetime | None:
        days = self.cleaned_data["expires_in_days"]
        return timezone.now() + timedelta(days=days) if days is not None else None

    def key_kwargs(self) -> dict:
        data = self.cleaned_data
        return {
            "name": data["name"],
            "allowed_models": data["allowed_models"],
            "rpm": data["rpm"],
            "tpm": data["tpm"],
            "budget_nano": data["budget"],
            "budget_period": data["budget_period"],
            "expires_at": self.expires_at(),
            "allowed_ips": _lines(data["allowed_ips"]),
        }


class KeyEditForm(KeyPolicyForm):
    """A key's name and policy, filled in from the key; `key_kwargs()` gives what
    `key_update_policy` takes. The expiry stays as it is unless a new number of days is
    given or it is removed: re-saving the form must not move it."""

    never_expires = forms.BooleanField(
        label=_("Remove the expiry"),
        required=False,
        help_text=_("The key will not expire."),
    )

    def __init__(self, *args, model_names: list[str], key: ApiKey, **kwargs) -> None:
        self.key = key
        kwargs.setdefault(
            "initial",
            {
                "name": key.name,
                "allowed_models": key.allowed_models,
                "rpm": key.rpm,
                "tpm": key.tpm,
                "budget": _usd_exact(key.budget_nano) if key.budget_nano is not None else "",
                "budget_period": key.budget_period,
                "allowed_ips": "\n".join(key.allowed_ips),
            },
        )
        # A key may allow a model that is no longer callable: keep it choosable, or saving
        # the form would silently drop it.
        super().__init__(*args, model_names=[*{*model_names, *key.allowed_models}], **kwargs)
        self.fields["expires_in_days"].help_text = _("Empty: keep the current expiry.")

    def expires_at(self) -> datetime | None:
        if self.cleaned_data["expires_in_days"] is not None:
            return super().expires_at()
        if self.cleaned_data["never_expires"]:
            return None
        return self.key.expires_at
