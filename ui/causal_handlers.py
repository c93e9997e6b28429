"""The Gradio adapters of "Does it matter?": a knockout of the box, the map's top cells or the image, and the
layer sweep. `handlers.Handlers` inherits them; they use its settings, store and model slot."""

from __future__ import annotations

import gradio as gr

from pictures.causal_views import knockout_note, sweep_figure, sweep_note
from pipeline import knockout_check, knockout_layers
from ui.components import user_errors, whole_number


def _cells(region) -> list[tuple[int, int]]:
    """The session's region (clicked cells, as lists) as (row, col) pairs."""
    return [tuple(cell) for cell in region or []]


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
            self.slot, stored, s, target, whole_number(top_k, "k", minimum=1), bool(in_ranges), _cells(region)
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
            whole_number(window, "The window", minimum=1),
            bool(in_ranges),
            _cells(region),
            progress=lambda done, total: progress(done / total, desc=f"{done} of {total} knockouts"),
        )
        return sweep_figure(sweep), sweep_note(sweep)
