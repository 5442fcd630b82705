"""Line plots that draw every series they are sent, including one whose first point comes late.

Gradio's LinePlot (6.31) builds its Vega-Lite chart once, from the first value it shows; later
values only replace the chart's data. The colour scale's domain is the list of series in that
first value, so a series that first appears in a later frame gets no colour and no legend entry,
and its line is never drawn (the lab streams Falcon Mamba's samples before the transformer's;
color_map and yielding gr.LinePlot(value=...) change nothing). So every plot declares its series
and their colours up front (series_plot), and every frame it is sent holds at least one row of
each (series_frame): a series with no data yet gets one row whose values are NaN. Vega-Lite drops
rows with invalid values before drawing and before computing the axes' domains, so such a row
adds the series to the legend and nothing else.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import gradio as gr
import pandas as pd

SERIES = "series"  # the column every plot colours its lines by


def series_plot(
    series: Mapping[str, str], value: pd.DataFrame | None = None, **kwargs: Any
) -> gr.LinePlot:
    """A LinePlot coloured by the SERIES column; `series` maps each series it will show to its colour.

    Build its frames with series_frame over the same series, so that the first frame the browser
    sees already names them all.
    """
    return gr.LinePlot(value, color=SERIES, color_map=dict(series), **kwargs)


def typed_frame(rows: list[dict], dtypes: dict[str, str]) -> pd.DataFrame:
    """A plot frame with fixed column types, also when empty: the browser's chart infers axis
    types from the data, and an empty untyped frame would turn numbers into categories."""
    return pd.DataFrame(rows, columns=list(dtypes)).astype(dtypes)


def series_frame(rows: list[dict], dtypes: dict[str, str], x: str, series: Iterable[str]) -> pd.DataFrame:
    """`rows` as a typed frame, plus one row for each of `series` that has none: at the frame's
    smallest x (0 when empty, so the x axis keeps its extent) with NaN in every value column.

    Value columns (all but `x` and SERIES) must be float, the only numeric type that holds NaN.
    """
    frame = typed_frame(rows, dtypes)
    present = set(frame[SERIES])
    missing = [s for s in series if s not in present]
    if not missing:
        return frame
    at = frame[x].min() if len(frame) else 0
    placeholders = [{x: at, SERIES: s} for s in missing]  # other columns: NaN
    return typed_frame(rows + placeholders, dtypes)
