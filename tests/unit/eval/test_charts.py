"""The one rule of launch's charts (``launcher.eval.charts``): a number a chart cannot place (not a
finite number, or past ``CHART_LIMIT`` where matplotlib's axis arithmetic overflows) is left off
the chart, and the chart says how many were; the table and results.json keep them. Pure: charts
drawn in memory."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.eval.charts import CHART_LIMIT, drawable, left_off_note
from launcher.eval.ppl.chart import chart_figure, chart_png
from launcher.eval.ppl.runs import Row, Run

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
NUMBERS = (st.floats() | st.integers(min_value=-(10**400), max_value=10**400)
           | st.sampled_from([1e308, -1e308, 1.7976931348623157e308, CHART_LIMIT, math.nextafter(CHART_LIMIT, math.inf),
                              2.5, 0.0]))
ANY = NUMBERS | st.none() | st.booleans() | st.text(max_size=3)


@given(value=ANY)
def test_drawable_is_a_real_finite_number_within_the_limit(value):
    expected = (isinstance(value, (int, float)) and not isinstance(value, bool)
                and abs(value) <= CHART_LIMIT and (not isinstance(value, float) or math.isfinite(value)))
    assert drawable(value) is expected


def test_the_note_says_how_many_and_where_they_are_and_nothing_for_none():
    assert left_off_note(0) is None
    one, three = left_off_note(1), left_off_note(3)
    assert "1 value " in one and "3 values " in three
    assert all("left off the chart" in n and "results.json" in n for n in (one, three))


LOSS = st.none() | NUMBERS.filter(lambda v: not isinstance(v, int) or abs(v) < 10**300)  # a Row holds floats
ROWS = st.lists(st.tuples(st.integers(min_value=3, max_value=10_000_000), LOSS, LOSS), min_size=1, max_size=4,
                unique_by=lambda r: r[0])


@PROPERTY
@given(runs=st.lists(ROWS, min_size=1, max_size=3), native=st.none() | st.integers(1, 2**31 - 1))
def test_the_ppl_chart_draws_every_placeable_loss_and_says_how_many_it_left_off(runs, native):
    built = [Run(f"run {i}", native, 2, tuple(Row(n, float(w) if w is not None else None,
                                                  float(s) if s is not None else None, 0) for n, w, s in rows), False)
             for i, rows in enumerate(runs)]
    fig = chart_figure(built, "t")
    values = [v for run in built for row in run.rows for v in (row.window_loss, row.span_loss) if v is not None]
    placed = sorted(v for v in values if drawable(v))
    ax = fig.axes[0]
    drawn = sorted(float(y) for line in ax.lines if not line.get_label().startswith("_") for y in line.get_ydata())
    assert drawn == placed
    notes = [t.get_text() for t in fig.texts if "left off the chart" in t.get_text()]
    assert notes == ([left_off_note(len(values) - len(placed))] if len(values) > len(placed) else [])
    png = chart_png(built, "t")  # and it renders: the overflow was at drawing time
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_loss_that_crashed_matplotlib_is_left_off():
    """issue 17, F3.3: every window at 1e308 ended in ``ValueError: arange: cannot compute length``."""
    run = Run("m", None, 100, (Row(300, 1e308, None, 1), Row(600, 1e308, None, 1)), True)
    assert chart_png([run], "t")[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(t.get_text() == left_off_note(2) for t in chart_figure([run], "t").texts)
