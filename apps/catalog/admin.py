"""Operators' view of models, prices and upstream channels.

A channel's provider key is write-only here: it is never listed, never put in a form,
and a blank field keeps the current one. Prices are only added: a new price is a new
version, and past charges keep the one they were made at.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from apps.billing.money import MoneyError, format_usd, parse_usd
from apps.catalog.models import Channel, ChannelModel, LanguageModel, Price
from apps.catalog.services import price_set


class ChannelForm(forms.ModelForm):
    base_url = forms.URLField(label=_("Base URL"), required=False, assume_scheme="https")
    new_api_key = forms.CharField(
        label=_("Provider API key"),
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text=_("Write-only: never shown. Leave empty to keep the current key."),
    )

    class Meta:
        model = Channel
        # Named one by one, so a field added to Channel later is not put in a form unseen.
        fields = (
            "name",
            "kind",
            "base_url",
            "priority",
            "weight",
            "is_enabled",
            "timeout_seconds",
            "settings",
        )

    def save(self, commit: bool = True) -> Channel:
        channel = super().save(commit=False)
        if self.cleaned_data.get("new_api_key"):
            channel.api_key = self.cleaned_data["new_api_key"]
        if commit:
            channel.save()
            self.save_m2m()
        return channel


class ChannelModelInline(admin.TabularInline):
    model = ChannelModel
    fields = ("model", "upstream_name")
    extra = 0


@admin.register(Channel)
class ChannelAdmin(admin.ModelAdmin):
    form = ChannelForm
    list_display = ("name", "kind", "base_url", "priority", "weight", "is_enabled", "has_api_key")
    list_filter = ("kind", "is_enabled")
    search_fields = ("name",)
    fields = (
        "name",
        "kind",
        "base_url",
        "new_api_key",
        "has_api_key",
        "priority",
        "weight",
        "is_enabled",
        "timeout_seconds",
        "settings",
    )
    readonly_fields = ("has_api_key",)
    inlines = [ChannelModelInline]

    @admin.display(boolean=True, description=_("has a key"))
    def has_api_key(self, channel: Channel) -> bool:
        return bool(channel.api_key)


@admin.register(LanguageModel)
class LanguageModelAdmin(admin.ModelAdmin):
    list_display = ("name", "owned_by", "max_output_tokens", "is_enabled", "created_at")
    list_filter = ("is_enabled",)
    search_fields = ("name",)


def _usd_per_mtok_field(label: str, *, required: bool = True) -> forms.CharField:
    return forms.CharField(
        label=label, required=required, help_text=_("USD per million tokens, e.g. 2.50")
    )


class PriceAddForm(forms.ModelForm):
    """Prices come in as USD text, parsed once by parse_usd: never through a float."""

    input_usd = _usd_per_mtok_field(_("Input"))
    output_usd = _usd_per_mtok_field(_("Output"))
    cached_input_usd = _usd_per_mtok_field(_("Cached input"), required=False)
    cache_write_usd = _usd_per_mtok_field(_("Cache write"), required=False)

    class Meta:
        model = Price
        fields = ("model",)

    def _nano(self, name: str) -> int | None:
        text = self.cleaned_data.get(name) or ""
        if not text.strip():
            return None
        try:
            return parse_usd(text)
        except MoneyError as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_input_usd(self) -> int | None:
        return self._nano("input_usd")

    def clean_output_usd(self) -> int | None:
        return self._nano("output_usd")

    def clean_cached_input_usd(self) -> int | None:
        return self._nano("cached_input_usd")

    def clean_cache_write_usd(self) -> int | None:
        return self._nano("cache_write_usd")


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    form = PriceAddForm
    list_display = (
        "model",
        "input_usd",
        "cached_input_usd",
        "cache_write_usd",
        "output_usd",
        "created_at",
    )
    list_select_related = ("model",)
    list_filter = ("model",)

    def get_fields(self, request: HttpRequest, obj: Price | None = None) -> list[str]:
        if obj is None:
            return ["model", "input_usd", "output_usd", "cached_input_usd", "cache_write_usd"]
        return list(self.list_display)  # a price is never edited: shown as listed

    @admin.display(description=_("input, USD per 1M tokens"))
    def input_usd(self, price: Price) -> str:
        return format_usd(price.input_nano_per_mtok)

    @admin.display(description=_("cached input, USD per 1M tokens"))
    def cached_input_usd(self, price: Price) -> str:
        return format_usd(price.cached_input_nano_per_mtok)

    @admin.display(description=_("cache write, USD per 1M tokens"))
    def cache_write_usd(self, price: Price) -> str:
        return format_usd(price.cache_write_nano_per_mtok)

    @admin.display(description=_("output, USD per 1M tokens"))
    def output_usd(self, price: Price) -> str:
        return format_usd(price.output_nano_per_mtok)

    def save_model(self, request: HttpRequest, obj: Price, form: Any, change: bool) -> None:
        data = form.cleaned_data
        price = price_set(
            model_name=obj.model.name,
            input_nano_per_mtok=data["input_usd"],
            output_nano_per_mtok=data["output_usd"],
            cached_input_nano_per_mtok=data["cached_input_usd"],
            cache_write_nano_per_mtok=data["cache_write_usd"],
        )
        # The admin logs and links the row the service inserted.
        obj.pk, obj.created_at = price.pk, price.created_at

    def has_change_permission(self, request: HttpRequest, obj: Price | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Price | None = None) -> bool:
        return False
