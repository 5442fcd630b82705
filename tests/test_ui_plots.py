"""Plot frames name every series of their plot, so the browser's chart draws each one.

The chart fixes its series from the first frame it shows (see fm_demo/ui/plots.py); the browser
tests check the drawn legends, these check the frames every plot of the app is sent.
"""

from __future__ import annotations

import math

import gradio as gr
from test_ui_handlers import tiny_context

from fm_demo.settings import Settings
from fm_demo.ui import build_demo
from fm_demo.ui.plots import SERIES, series_frame

DTYPES = {"x": "int64", SERIES: "object", "y": "float64", "z": "float64"}


def test_a_series_without_data_gets_one_nan_row_at_the_smallest_x():
    rows = [{"x": 8, SERIES: "a", "y": 1.0, "z": 2.0}, {"x": 4, SERIES: "a", "y": 3.0, "z": 4.0}]
    frame = series_frame(rows, DTYPES, "x", ["a", "b"])
    assert frame.dtypes.astype(str).to_dict() == DTYPES
    assert frame[SERIES].tolist() == ["a", "a", "b"]
    placeholder = frame.iloc[-1]
    assert placeholder["x"] == 4 and math.isnan(placeholder["y"]) and math.isnan(placeholder["z"])


def test_an_empty_frame_names_every_series_and_a_full_one_is_left_alone():
    empty = series_frame([], DTYPES, "x", ["a", "b"])
    assert empty[SERIES].tolist() == ["a", "b"] and (empty["x"] == 0).all() and empty["y"].isna().all()
    rows = [{"x": 1, SERIES: s, "y": 1.0, "z": 1.0} for s in ("b", "a")]
    assert len(series_frame(rows, DTYPES, "x", ["a", "b"])) == 2


def test_every_plot_of_the_app_declares_its_series_and_starts_with_all_of_them(tmp_path_factory):
    ctx = tiny_context(Settings(device="cpu"), tmp_path_factory)
    plots = [b for b in build_demo(ctx.settings, ctx).blocks.values() if isinstance(b, gr.LinePlot)]
    assert {p.elem_id for p in plots} >= {"chat-memory", "chat-speed", "lab-speed", "lab-cache", "lab-prefill"}
    for plot in plots:
        assert plot.color == SERIES and plot.color_map, f"{plot.elem_id} does not declare its series"
        if plot.value:  # a first value, shown before any event: it must name every series already
            column = plot.value["columns"].index(SERIES)
            assert {row[column] for row in plot.value["data"]} == set(plot.color_map), plot.elem_id
