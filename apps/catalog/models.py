"""Models customers can call, their prices, and the upstream channels that serve them."""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class LanguageModel(models.Model):
    """A model by the name customers use (`gpt-4o`, `claude-sonnet-4`)."""

    name = models.CharField(max_length=100, unique=True)
    owned_by = models.CharField(max_length=100, default="real200")
    max_output_tokens = models.PositiveIntegerField(default=8192)
    is_enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class Price(models.Model):
    """One version of a model's price, in nano-dollars per million tokens.

    Rows are only inserted: a price change is a new row, and each usage record points at
    the row it was charged with, so a change never rewrites a past charge. The current
    price of a model is its newest row.

    Prompt tokens come at three rates: plain input, `cached_input` for the tokens an
    upstream reads from its prompt cache, and `cache_write` for those it writes to it
    (Anthropic charges 1.25 times its input rate for those).
    """

    model = models.ForeignKey(LanguageModel, on_delete=models.PROTECT, related_name="prices")
    input_nano_per_mtok = models.BigIntegerField()
    output_nano_per_mtok = models.BigIntegerField()
    cached_input_nano_per_mtok = models.BigIntegerField()
    cache_write_nano_per_mtok = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        get_latest_by = "pk"
        constraints = [
            models.CheckConstraint(
                condition=models.Q(input_nano_per_mtok__gte=0)
                & models.Q(output_nano_per_mtok__gte=0)
                & models.Q(cached_input_nano_per_mtok__gte=0)
                & models.Q(cache_write_nano_per_mtok__gte=0),
                name="price_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} price #{self.pk}"

    def save(self, *args, **kwargs) -> None:
        if self.pk is not None:
            raise ValueError("a price is never edited: set a new one")
        super().save(*args, **kwargs)


class ChannelKind(models.TextChoices):
    OPENAI = "openai", _("OpenAI-compatible")
    ANTHROPIC = "anthropic", _("Anthropic")
    DEMO = "demo", _("Built-in demo")


class Channel(models.Model):
    """An upstream provider account. `api_key` is the provider's secret: it never leaves
    the server, never reaches a log, and the admin does not show it.

    Routing tries the highest `priority` first; among equals, a weighted random order.
    """

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=16, choices=ChannelKind.choices)
    base_url = models.URLField(blank=True)
    api_key = models.CharField(max_length=500, blank=True)
    priority = models.IntegerField(default=0)
    weight = models.PositiveIntegerField(default=1)
    is_enabled = models.BooleanField(default=True)
    timeout_seconds = models.FloatField(default=60.0)  # first byte, and between chunks
    settings = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(weight__gte=1), name="channel_weight_positive"
            ),
            models.CheckConstraint(
                condition=models.Q(timeout_seconds__gt=0), name="channel_timeout_positive"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class ChannelModel(models.Model):
    """A model a channel serves, and the name the upstream knows it by."""

    channel = models.ForeignKey(Channel, on_delete=models.CASCADE, related_name="model_links")
    model = models.ForeignKey(LanguageModel, on_delete=models.CASCADE, related_name="channel_links")
    upstream_name = models.CharField(max_length=200)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["channel", "model"], name="one_mapping_per_channel"),
        ]

    def __str__(self) -> str:
        return f"{self.channel}: {self.model} → {self.upstream_name}"
