"""The Gradio adapters of "Compare two runs": keep the current result as A, then draw it against the
current result (B) at the selected token. `handlers.Handlers` inherits them; they use its settings and
store (both results stay in the session store and count against its cap)."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from errors import EvictedError
from pictures.compare import compare_runs
from pictures.views import as_text
from ui.components import user_errors

COMPARE_OUTPUTS = ("compare_picture", "compare_plot", "compare_note", "compare_shown")
NO_RUN_A = (
    "No result is kept as A yet: press 'Keep this result as A', then generate B (another model, prompt or "
    "image of the same size)."
)


class CompareHandlers:
    """Handlers of the comparison tab (a mixin of `handlers.Handlers`)."""

    @user_errors
    def compare_keep(self, run_id) -> tuple:
        """(run A's id, a note saying what A is, no comparison shown): the current result, kept for comparing."""
        stored = self.store.get(run_id)
        run = stored.run
        note = (
            f"**A:** {as_text(run.model_id)} · {as_text(repr(run.settings.prompt))} · "
            f"{run.vision.image_size[0]}×{run.vision.image_size[1]} px · {run.num_steps} tokens. Now generate B: "
            "load another model, change the prompt or upload another image of the same size, then press "
            "'Compare with A'."
        )
        return run_id, note, False

    @user_errors
    def compare(self, run_id, run_a, match, *view_values) -> tuple:
        """(picture, per-layer share table, note, shown): A against the current result B at B's selected token."""
        if not run_a:
            return None, None, NO_RUN_A, False
        stored_b = self.store.get(run_id)
        try:
            stored_a = self.store.get(run_a)
        except EvictedError as err:
            raise EvictedError(
                "Result A was removed to free memory for other sessions; keep a result as A again."
            ) from err
        s = self._settings(*view_values)
        found = compare_runs(
            stored_a,
            stored_b,
            s.step_idx,
            match or "position",
            layers=s.layers,
            heads=s.heads,
            reduce=s.reduce,
            colormap=s.colormap,
            alpha=s.alpha,
            step_in="b",
        )
        names = (f"A: {stored_a.run.model_id}", f"B: {stored_b.run.model_id}")
        if names[0] == names[1]:
            names = ("A", "B")
        table = pd.DataFrame(
            [
                {"layer": int(layer), "share": float(share), "run": name}
                for name, layers, shares in (
                    (names[0], found.layers_a, found.shares_a),
                    (names[1], found.layers_b, found.shares_b),
                )
                for layer, share in zip(layers, shares, strict=True)
            ]
        )
        return found.picture, table, as_text(found.caption), True

    def compare_follow(self, run_id, run_a, match, shown, *view_values) -> tuple:
        """The comparison again after the token or the ranges changed, once it has been shown for A."""
        if not shown or not run_a or run_id is None:
            return tuple(gr.skip() for _ in COMPARE_OUTPUTS)
        return self.compare(run_id, run_a, match, *view_values)
