"""The page's controls by name: one frozen record of the view controls and one of the views derived from
a result, from which the wiring, the API's parameters and the outputs a new result clears all follow.

A field's metadata says what the rest of the app needs to know about it:
- `default`: the API's default when a client leaves the value out (the page's own ranges when None);
- `reset`: the value a new result sets it to (absent: a new result leaves it as it is);
- `redraw`: a change of it only redraws the map (the API's `render`); the others have events of their own;
- `make`: for a control the layout does not place itself, a factory of its component; such a control
  goes in the "More display options" group, redraws the map, is passed to every view event and named
  in the API.
Handlers receive values in the order of these records and key them by name at once (`by_name`); they
return values by name, packed into the wired order by `pack`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import gradio as gr

from attention_processor import RAW_ATTENTION
from config import AppConfig
from pictures.views import region_note

NO_REGION = region_note(None, set(), None)  # what the region view says before a cell is picked
KNOCKOUT_HINT = (
    "Does the attention matter? Knock out the target box (or the region's cells), the map's strongest cells "
    "or the whole image, and see how the selected token's probability changes against random regions."
)


def control(default: Any = None, *, reset: Any = ..., make=None, redraw: bool = False) -> Any:
    metadata = {"default": default, "make": make, "redraw": redraw or make is not None}
    if reset is not ...:
        metadata["reset"] = reset
    return field(metadata=metadata)


@dataclass(frozen=True)
class ViewControls:
    """The controls that decide one picture, in the order of the API's parameters after `run_id`."""

    token: Any = control(0, reset=0)
    layer_lo: Any = control(None)
    layer_hi: Any = control(None)
    head_lo: Any = control(None)
    head_hi: Any = control(None)
    aggregation: Any = control(AppConfig.aggregation, redraw=True)
    normalization: Any = control(AppConfig.normalization, redraw=True)
    colormap: Any = control(AppConfig.colormap, redraw=True)
    alpha: Any = control(AppConfig.alpha)
    view: Any = control(AppConfig.view, redraw=True)
    grid: Any = control(False, redraw=True)
    renormalize: Any = control(False, redraw=True)
    mask_sinks: Any = control(False, reset=False, redraw=True)  # needs one image: a new result starts without
    relative: Any = control(False, reset=False)  # needs a model pass (the baseline)
    prompt_token: Any = control(None, reset="", redraw=True)
    exclude_system: Any = control(False, redraw=True)
    method: Any = control(RAW_ATTENTION, reset=RAW_ATTENTION)
    target_box: Any = control("")
    # Cells are drawn crisp, each a flat block (a peak sits on its cell); smoothing blends neighbours.
    smooth: Any = control(
        False, make=lambda: gr.Checkbox(False, label="Smooth across cells (bilinear)", elem_id="smooth")
    )
    # Several generated tokens at once ("3, 4" or "3-5"; shift-click chips, or pick a word): maps combined.
    tokens: Any = control("", reset="")
    combine: Any = control("sum", redraw=True)
    contrast_token: Any = control(None, reset=None, redraw=True)  # minus another token's map
    contrast_prompt: Any = control("", reset="")  # minus another prompt's map: a model pass
    parts: Any = control(False, redraw=True)  # what the method built its map from, beside it


@dataclass(frozen=True)
class DerivedViews:
    """Views computed from one result; a new result sets each to its `reset` value, so nothing on the page
    belongs to an older run."""

    matrix: Any = control(reset=None)
    text: Any = control(reset=None)
    gallery: Any = control(reset=[])
    note: Any = control(reset="")
    lens_view: Any = control(reset="")
    lens_file: Any = control(reset=None)
    verify_plot: Any = control(reset=None)
    verify_insertion: Any = control(reset=None)
    verify_note: Any = control(reset="")
    region_plot: Any = control(reset=None)
    region_note: Any = control(reset=NO_REGION)
    ko_note: Any = control(reset=KNOCKOUT_HINT)
    ko_plot: Any = control(reset=None)


def names(record) -> tuple[str, ...]:
    """The field names of a record class or instance, in order."""
    return tuple(f.name for f in fields(record))


def defaults(record) -> dict[str, Any]:
    """name -> the API's default, for every field of `record`."""
    return {f.name: f.metadata["default"] for f in fields(record)}


def redraws(record) -> tuple[str, ...]:
    """The fields whose change only redraws the map."""
    return tuple(f.name for f in fields(record) if f.metadata["redraw"])


def resets(record) -> dict[str, Any]:
    """name -> the value a new result sets, for the fields that have one."""
    return {f.name: f.metadata["reset"] for f in fields(record) if "reset" in f.metadata}


def by_name(record, values: tuple) -> dict[str, Any]:
    """Positional values in `record`'s order (trailing ones may be left out) keyed by name, with the
    defaults for those left out."""
    order = names(record)
    if len(values) > len(order):
        raise TypeError(f"Got {len(values)} values for the {len(order)} controls {', '.join(order)}.")
    return {**defaults(record), **dict(zip(order, values, strict=False))}


def pack(order: tuple[str, ...], **values) -> tuple:
    """Values by name as the tuple of the wired outputs `order`; a name without a value is left as it is
    on the page (gr.skip())."""
    unknown = set(values) - set(order)
    if unknown:
        raise TypeError(f"{sorted(unknown)} are not among the wired outputs {order}.")
    return tuple(values[name] if name in values else gr.skip() for name in order)


# Outputs wired to several events, by name, in their wired order (`app.wire` looks the names up).
VIEW_OUTPUTS = ("picture", "caption", "plot")
MODEL_OUTPUTS = ("status", "layer_range", "head_range", "video")
PAGE_OUTPUTS = (*MODEL_OUTPUTS, "status_timer")
# A new result: its id and answer, the token pickers with their new choices, its first picture, the view
# controls a new result resets, the region, every derived view (cleared) and the downloads (emptied). The
# first names keep the order API clients of /generate have always read; reset controls added later follow.
_GENERATE_HEAD = (
    "run_id",
    "answer",
    "token",
    "chips",
    *VIEW_OUTPUTS,
    "prompt_token",
    "mask_sinks",
    "relative",
    "region",
    "method",
)


def generate_outputs(record=ViewControls) -> tuple[str, ...]:
    """The outputs of a generation, by name, for the view controls' `record`."""
    added = tuple(name for name in resets(record) if name not in _GENERATE_HEAD)
    return (*_GENERATE_HEAD, *added, *names(DerivedViews), "files", "word")


ANALYSIS_OUTPUTS = ("matrix", "text", "gallery", "note")  # the layers × heads tab and the gallery
BOX_OUTPUTS = ("corner", "target_box", *VIEW_OUTPUTS)  # a click while drawing the target box
REGION_OUTPUTS = ("region", "region_plot", "region_note")  # a click that picks a region cell


@dataclass(frozen=True)
class Page:
    """Every component of the page by name: the view controls, the derived views, and the rest (`parts`)."""

    view: ViewControls
    derived: DerivedViews
    parts: dict

    def __getitem__(self, name: str):
        for record in (self.view, self.derived):
            if name in names(record):
                return getattr(record, name)
        return self.parts[name]

    def pick(self, wanted) -> list:
        """The components named in `wanted`, in that order."""
        return [self[name] for name in wanted]

    @property
    def view_inputs(self) -> list:
        """The view controls as every view event takes them, in the API's order."""
        return [getattr(self.view, name) for name in names(self.view)]
