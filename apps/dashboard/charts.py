"""Stacked bar charts drawn as inline SVG by the server: no script, no library, nothing
fetched by the browser. Everything a template needs is computed here, in whole SVG units,
so the template only places shapes and text.

Each chart comes with the same numbers as a table (the accessible form of the data) and
each bar segment carries a <title>, which browsers show as a tooltip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date

from django.utils.translation import gettext as _

# Okabe and Ito's palette: colours told apart with the common colour-vision deficiencies.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00")
OTHER_COLOUR = "#8a939d"

# In SVG units: a 30-day chart is about 1000 wide, drawn at about its own size on a
# laptop; its text (13 units, see money.css) stays legible down to the 48rem it keeps
# on a phone, where it scrolls sideways.
BAR_WIDTH = 20
SLOT = 30  # a bar and the gap after it
LEFT = 84  # room for the value axis labels
TOP = 12
PLOT_HEIGHT = 200
BOTTOM = 28  # room for the day labels


@dataclass(frozen=True, slots=True)
class Segment:
    y: int
    height: int
    colour: str
    title: str


@dataclass(frozen=True, slots=True)
class Bar:
    x: int
    title: str
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class Tick:
    y: int
    label: str


@dataclass(frozen=True, slots=True)
class DayLabel:
    x: int
    label: str


@dataclass(frozen=True, slots=True)
class LegendItem:
    label: str
    colour: str
    total: str


@dataclass(frozen=True, slots=True)
class TableRow:
    day: date
    cells: tuple[str, ...]
    total: str


@dataclass(frozen=True, slots=True)
class StackedBarChart:
    title: str
    summary: str
    width: int
    height: int
    plot_left: int
    plot_right: int
    plot_bottom: int
    axis_label_x: int  # where the value labels end, left of the plot
    day_label_y: int  # the baseline of the day labels, under the plot
    bar_width: int
    bars: tuple[Bar, ...]
    ticks: tuple[Tick, ...]
    day_labels: tuple[DayLabel, ...]
    legend: tuple[LegendItem, ...]
    columns: tuple[str, ...]  # the table's series columns, as the legend
    rows: tuple[TableRow, ...]
    totals: tuple[str, ...]
    grand_total: str
    is_empty: bool


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least `value` (at least 1):
    an axis top whose halves read well."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if factor * step >= value:
                return factor * step
        step *= 10


def _merge_small(
    series: Sequence[tuple[str, Sequence[int]]], keep: int, days: int
) -> list[tuple[str, list[int]]]:
    """The first `keep` series as they are, the rest summed into one "Other" series."""
    merged = [(label, list(values)) for label, values in series[:keep]]
    rest = series[keep:]
    if rest:
        other = [sum(values[i] for _label, values in rest) for i in range(days)]
        merged.append((_("Other"), other))
    return merged


def stacked_bar_chart(
    *,
    title: str,
    days: Sequence[date],
    series: Sequence[tuple[str, Sequence[int]]],
    fmt: Callable[[int], str],
) -> StackedBarChart:
    """A bar per day, stacked by series (biggest first; past the palette, the rest are
    one "Other" series). `fmt` writes a value for people: dollars, tokens."""
    count = len(days)
    stacks = _merge_small(series, len(PALETTE), count)
    colours = [*PALETTE, OTHER_COLOUR][: len(stacks)]
    day_totals = [sum(values[i] for _label, values in stacks) for i in range(count)]
    top = nice_ceiling(max(day_totals, default=0))
    bottom = TOP + PLOT_HEIGHT

    def y_of(amount: int) -> int:
        # Rounded up, so any non-zero stack is at least one unit tall.
        return bottom - -(-amount * PLOT_HEIGHT // top)

    bars = []
    for i, day in enumerate(days):
        segments, below = [], 0
        for (label, values), colour in zip(stacks, colours, strict=True):
            if values[i]:
                upper = y_of(below + values[i])
                segments.append(
                    Segment(
                        y=upper,
                        height=y_of(below) - upper,
                        colour=colour,
                        title=f"{day.isoformat()} · {label}: {fmt(values[i])}",
                    )
                )
                below += values[i]
        bars.append(
            Bar(
                x=LEFT + i * SLOT + (SLOT - BAR_WIDTH) // 2,
                title=f"{day.isoformat()}: {fmt(day_totals[i])}",
                segments=tuple(segments),
            )
        )
    ticks = [Tick(y=bottom, label=fmt(0)), Tick(y=TOP, label=fmt(top))]
    if top % 2 == 0:
        ticks.insert(1, Tick(y=y_of(top // 2), label=fmt(top // 2)))
    # Label every seventh day, counted back from the last, so today is always labelled.
    day_labels = [
        DayLabel(x=LEFT + i * SLOT + SLOT // 2, label=day.strftime("%m-%d"))
        for i, day in enumerate(days)
        if (count - 1 - i) % 7 == 0
    ]
    grand = sum(day_totals)
    peak = max(range(count), key=lambda i: day_totals[i]) if count else 0
    summary = (
        _("Total %(total)s; the highest day was %(day)s with %(peak)s.")
        % {"total": fmt(grand), "day": days[peak].isoformat(), "peak": fmt(day_totals[peak])}
        if grand
        else _("Nothing in this period.")
    )
    return StackedBarChart(
        title=title,
        summary=summary,
        width=LEFT + count * SLOT + 4,
        height=bottom + BOTTOM,
        plot_left=LEFT,
        plot_right=LEFT + count * SLOT,
        plot_bottom=bottom,
        axis_label_x=LEFT - 6,
        day_label_y=bottom + 20,
        bar_width=BAR_WIDTH,
        bars=tuple(bars),
        ticks=tuple(ticks),
        day_labels=tuple(day_labels),
        legend=tuple(
            LegendItem(label=label, colour=colour, total=fmt(sum(values)))
            for (label, values), colour in zip(stacks, colours, strict=True)
        ),
        columns=tuple(label for label, _values in stacks),
        rows=tuple(
            TableRow(
                day=day,
                cells=tuple(fmt(values[i]) for _label, values in stacks),
                total=fmt(day_totals[i]),
            )
            for i, day in enumerate(days)
        ),
        totals=tuple(fmt(sum(values)) for _label, values in stacks),
        grand_total=fmt(grand),
        is_empty=not grand,
    )
