"""Forms of the balance and usage pages. They parse and check shapes; the billing services
decide what an amount may be (bounds, whole cents) and say so in their own messages."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, time, timedelta

from django import forms
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _

from apps.billing.money import MoneyError, Nano, parse_usd
from apps.keys.models import ApiKey
from apps.usage.selectors import RequestStatus, UsageFilters, key_label


class UsdField(forms.CharField):
    """An amount in US dollars typed as text ("25", "25.50"), cleaned to nano-dollars by
    `parse_usd`: never through a float."""

    default_error_messages = {
        "invalid": _("Enter an amount in US dollars, such as 25.00."),
    }

    # Enough for any amount the books can hold, to the nano-dollar.
    MAX_LENGTH = 24

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.widget.attrs.update(
            {"inputmode": "decimal", "autocomplete": "off", "maxlength": self.MAX_LENGTH}
        )

    def to_python(self, value: str | None) -> Nano | None:
        text = super().to_python(value).removeprefix("$").strip()
        if text in self.empty_values:
            return None
        if len(text) > self.MAX_LENGTH:
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        try:
            return parse_usd(text)
        except MoneyError:
            raise ValidationError(self.error_messages["invalid"], code="invalid") from None


class RedeemForm(forms.Form):
    code = forms.CharField(
        label=_("Code"),
        max_length=64,
        widget=forms.TextInput(
            attrs={"autocomplete": "off", "autocapitalize": "characters", "spellcheck": "false"}
        ),
    )


class TopUpForm(forms.Form):
    amount = UsdField(label=_("Amount (USD)"))


class ThresholdForm(forms.Form):
    threshold = UsdField(
        label=_("Warn me below (USD)"),
        required=False,
        help_text=_("Leave empty to turn the warning off."),
    )


class UsageFilterForm(forms.Form):
    """The request log's filters, from the query string. Keys and models are choices of
    this organization's own, so another organization's key id is simply not valid."""

    key = forms.TypedChoiceField(label=_("Key"), required=False, coerce=int, empty_value=None)
    model = forms.ChoiceField(label=_("Model"), required=False)
    status = forms.ChoiceField(
        label=_("Status"),
        required=False,
        choices=[("", _("Any status")), *RequestStatus.choices],
    )
    date_from = forms.DateField(
        label=_("From (UTC)"), required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    date_to = forms.DateField(
        label=_("To (UTC, inclusive)"),
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
    )

    def __init__(self, *args, keys: Iterable[ApiKey], models: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["key"].choices = [("", _("Any key"))] + [
            (key.pk, key_label(name=key.name, prefix=key.prefix, last_four=key.last_four))
            for key in keys
        ]
        self.fields["model"].choices = [("", _("Any model"))] + [(m, m) for m in models]

    def clean(self) -> dict:
        data = super().clean()
        start, end = data.get("date_from"), data.get("date_to")
        if start and end and start > end:
            self.add_error("date_to", _("The end date is before the start date."))
        return data

    def filters(self) -> UsageFilters:
        """The filters that are valid; a field with an error does not narrow the log (the
        form shows the error beside it)."""
        if not self.is_bound:
            return UsageFilters()
        self.is_valid()  # cleans; a field with an error is left out of cleaned_data
        data = self.cleaned_data
        start, end = data.get("date_from"), data.get("date_to")
        return UsageFilters(
            api_key_id=data.get("key"),
            model=data.get("model") or "",
            status=data.get("status") or "",
            since=datetime.combine(start, time.min, tzinfo=UTC) if start else None,
            until=datetime.combine(end, time.min, tzinfo=UTC) + timedelta(days=1) if end else None,
        )
