"""The Gradio adapters of "Does it matter?": a knockout of the box, the map's top cells or the image, and the
layer sweep. `handlers.Handlers` inherits them; they use its settings, store and model slot."""

from __future__ import annotations

import gradio as gr

from pictures.causal_views import knockout_note, sweep_figure, sweep_note
from pipeline import knockout_check, knockout_layers
from ui.components import user_errors


def _whole_number(value, name: str, lowest: int = 1) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or number < lowest:
        raise gr.Error(f"{name} must be a whole number of at least {lowest}, got {value!r}.")
    return int(number)


class CausalHandlers:
    """Handlers of the knockout panel (a mixin of `handlers.Handlers`). The last value is the session's
    region (cells clicked on the picture), after the view controls."""

    @user_errors
    def knockout(self, run_id, target, top_k, in_ranges, *values, progress=gr.Progress()) -> str:
        """The selected token's probability with `target` blocked, against random controls (model passes)."""
        *view_values, region = values
        stored, s = self._single(run_id), self._settings(*view_values)
        progress(0, desc="Replaying the token with the tokens blocked, and random controls")
        found, control, what = knockout_check(
            self.slot, stored, s, target, _whole_number(top_k, "k"), bool(in_ranges), [tuple(c) for c in region or []]
        )
        return knockout_note(found, control, what)

    @user_errors
    def knockout_sweep(self, run_id, window, in_ranges, *values, progress=gr.Progress()):
        """The layer sweep for the target box or region: (the line plot, its note)."""
        *view_values, region = values
        stored, s = self._single(run_id), self._settings(*view_values)
        progress(0, desc="Blocking the box in every window of layers, with random controls")
        sweep = knockout_layers(
            self.slot,
            stored,
            s,
            _whole_number(window, "The window"),
            bool(in_ranges),
            [tuple(c) for c in region or []],
            progress=lambda done, total: progress(done / total, desc=f"{done} of {total} knockouts"),
        )
        return sweep_figure(sweep), sweep_note(sweep)
