"""The causal checks as the page shows them: a knockout's verdict in words, and the layer sweep as a line
plot with the random-region control as a band. They read the records of `causal` (duck-typed: this floor
draws, it never runs the model)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from pictures.views import as_text, token_label

SWEEP_COLORS = {"box_token": "#d62728", "box_question": "#ff7f0e", "image_question": "#1f77b4"}
SWEEP_LABELS = {"box_token": "box → token", "box_question": "box → question", "image_question": "image → question"}


NO_EFFECT = 0.005  # a relative change below this is within what batching and kernels can move


def _spans(values) -> str:
    """Sorted whole numbers as runs: (0, 1, 2, 5) -> '0–2, 5'."""
    runs, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            runs.append(f"{start}" if start == value else f"{start}–{value}")
            start = None
    return ", ".join(runs)


def _percent(change: float) -> str:
    return f"{change * 100:+.1f}%"


def _spread(changes: np.ndarray) -> str:
    """The controls' relative changes in words: their mean and their range, NaN (nothing blocked) ignored."""
    mean, low, high = (float(f(changes)) for f in (np.nanmean, np.nanmin, np.nanmax))
    return f"{_percent(mean)} on average ({_percent(low)} to {_percent(high)})"


def _top(top: list[tuple[str, float]]) -> str:
    return ", ".join(f"{as_text(repr(text))} {p:.3f}" for text, p in top)


def knockout_note(found, control: np.ndarray, what: str) -> str:
    """Markdown: the token's probability before and after blocking `what`, the random controls' changes,
    and the five likeliest tokens before and after. found: a `causal.knockout.Knockout`; control: (n,)."""
    token = as_text(token_label(found.step_idx, found.token))
    layers = found.layers
    span = f"layers {layers[0]}–{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}" if layers else "no layer"
    heads = "all heads" if found.heads is None else f"heads {_spans(found.heads)}"
    lines = [
        f"**Token {token}**: p = {found.p_before:.4f} → **{found.p_after:.4f}** "
        f"({_percent(found.relative_change)}) with {as_text(what)} blocked from the token's query in "
        f"{span}, {heads}.",
    ]
    if len(control):
        lines.append(
            f"Control, the same knockout of {len(control)} random regions of that size elsewhere: {_spread(control)}."
        )
        rank = int((control <= found.relative_change).sum())  # controls that hurt as much or more
        if abs(found.relative_change) < NO_EFFECT:
            verdict = f"Blocking them barely changes the token (under {NO_EFFECT:.1%}): no measurable effect."
        elif rank == 0:
            verdict = f"The blocked tokens matter more than each of the {len(control)} random regions of their size."
        else:
            verdict = (
                f"{rank} of {len(control)} random regions of the same size matter as much or more: the effect is "
                "not specific to these tokens."
            )
        lines.append(verdict)
    lines.append(f"Top 5 before: {_top(found.top_before)} · after: {_top(found.top_after)}")
    lines.append(
        "Blocking removes only the direct attention edges; what the model copied into other positions "
        "earlier still flows."
    )
    return "\n\n".join(lines)


def sweep_figure(sweep) -> go.Figure:
    """Relative change of the token's probability per window of layers (x: the window's centre layer),
    one line per condition, and the control's draws as a band (min to max) around their mean."""
    x = [int(v) for v in sweep.centres]
    control = np.asarray(sweep.control, dtype=np.float64) * 100  # (n, draws) percent
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=x, y=control.max(axis=1).tolist(), mode="lines", line={"width": 0}, showlegend=False))
    figure.add_trace(
        go.Scatter(
            x=x,
            y=control.min(axis=1).tolist(),
            mode="lines",
            line={"width": 0},
            fill="tonexty",
            fillcolor="rgba(127,127,127,0.25)",
            name=f"control → token: {control.shape[1]} random regions of the box's size (min–max)",
        )
    )
    figure.add_trace(
        go.Scatter(
            x=x,
            y=control.mean(axis=1).tolist(),
            mode="lines",
            line={"color": "#7f7f7f", "dash": "dash"},
            name="control (mean) → token",
        )
    )
    for name, change in sweep.changes.items():
        figure.add_trace(
            go.Scatter(
                x=x,
                y=(np.asarray(change) * 100).tolist(),
                mode="lines+markers",
                line={"color": SWEEP_COLORS[name]},
                name=SWEEP_LABELS[name],
            )
        )
    window = int((sweep.windows[:, 1] - sweep.windows[:, 0]).max() + 1) if len(x) else 0
    figure.update_layout(
        title=f"Blocking a window of {window} layer{'s' if window > 1 else ''} around each layer (clipped at the ends)",
        xaxis={"title": "window centre (decoder layer, 0-based)", "dtick": 1 if len(x) <= 40 else None},
        yaxis_title="change of the token's probability (%)",
        height=320,
        margin={"l": 50, "r": 10, "t": 40, "b": 40},
        legend={"orientation": "h", "y": -0.3},
    )
    return figure


def sweep_note(sweep) -> str:
    """Markdown: which window matters most for the box → token edge, against the control there."""
    token = as_text(token_label(sweep.step_idx, sweep.token))
    box = np.asarray(sweep.changes["box_token"])
    if np.isnan(box).all():
        return f"**Token {token}**: no window of these layers has softmax attention to block."
    worst = int(np.nanargmin(box))
    lo, hi = (int(v) for v in sweep.windows[worst])
    control = np.asarray(sweep.control)[worst]
    return (
        f"**Token {token}** (p = {sweep.p_before:.4f}), the box's {sweep.box_tokens} image tokens: blocking them "
        f"from the token in {f'layer {lo}' if lo == hi else f'layers {lo}–{hi}'} lowers its probability "
        f"most, {_percent(float(box[worst]))}; "
        f"random regions of that size there: {_spread(control)}."
    )
