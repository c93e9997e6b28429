"""Causal checks: every knockout equals an independent teacher-forced eager forward with the same entries
masked (a per-head additive mask put in by forward pre-hooks), for every family; empty edits change nothing."""

import numpy as np
import pytest
import torch

from causal.edits import RowEdit
from causal.knockout import forward_outcomes, plan_knockout
from causal.positions import box_positions, image_positions, query_positions
from errors import InputError
from families import attention_implementation, decoder_layers, softmax_layers
from methods.faithfulness import token_probability
from testing.tiny_models import FAMILIES

RTOL, ATOL = 1e-4, 1e-7  # fp32 rounding between SDPA's math and eager


def _run(holder, image, steps=3):
    image_id = getattr(holder.model.config, "image_token_id", None) or holder.model.config.image_token_index
    return holder.generate(
        image, "What is in the picture?", max_new_tokens=steps, min_new_tokens=steps, suppress_tokens=[image_id]
    )


def _eager_probability(holder, run, step_idx: int, row: RowEdit) -> float:
    """The token's probability from an eager forward with `row`'s entries set to the dtype's minimum in a
    (1, H, S, S) additive mask, and its ablated heads' o_proj inputs zeroed or mean-replaced."""
    model, num_heads = holder.model, holder.num_heads
    inputs = holder.replay_inputs(run, step_idx)
    image = torch.from_numpy(image_positions(holder, run))
    handles = []

    def block(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seq, device = kwargs["hidden_states"].shape[1], kwargs["hidden_states"].device
        lowest = torch.finfo(torch.float32).min
        if mask is None:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
            additive = torch.zeros(1, 1, seq, seq, device=device).masked_fill(~causal, lowest)
        elif mask.dtype == torch.bool:
            additive = torch.zeros(mask.shape, device=device).masked_fill(~mask, lowest)
        else:
            additive = mask.clone()
        additive = additive[..., :seq].expand(1, num_heads, seq, seq).clone()  # (1, H, S, S)
        heads = torch.tensor(row.heads if row.heads is not None else range(num_heads))
        q, k = torch.tensor(row.queries), torch.tensor(row.keys)
        additive[0, heads[:, None, None], q[None, :, None], k[None, None, :]] = lowest
        kwargs["attention_mask"] = additive
        return args, kwargs

    def ablate(heads, head_dim):
        def hook(module, args):
            (flat,) = args  # (1, S, H * D)
            flat = flat.clone()
            for head in heads:
                cols = slice(head * head_dim, (head + 1) * head_dim)
                rows = image.to(flat.device)
                flat[:, :, cols] = 0 if row.mode == "zero" else flat[:, rows, cols].mean(dim=1, keepdim=True)
            return (flat,)

        return hook

    try:
        for idx in row.layers if row.blocks else ():
            attention = decoder_layers(model)[idx].self_attn
            handles.append(attention.register_forward_pre_hook(block, with_kwargs=True))
        for layer in {layer for layer, _ in row.ablate}:
            attention = decoder_layers(model)[layer].self_attn
            heads = [head for at, head in row.ablate if at == layer]
            handles.append(attention.o_proj.register_forward_pre_hook(ablate(heads, attention.head_dim)))
        with attention_implementation(model, text="eager"), torch.no_grad():
            logits = model(**inputs).logits[0, -1].float()  # (vocab,)
    finally:
        for handle in handles:
            handle.remove()
    return float(torch.softmax(logits, dim=-1)[run.generated_ids[step_idx]])


def _random_rows(holder, run, step_idx, rng, count=4) -> list[RowEdit]:
    """Random key sets, layer ranges, head subsets and query kinds, one with head ablation."""
    image = image_positions(holder, run)
    query_pos = len(run.prompt_ids) - 1 + step_idx
    attending = softmax_layers(holder.model)
    rows = []
    for i in range(count):
        queries = ("token", "question", "after_image", "token")[i]
        asked = query_positions(run, step_idx, queries, image)
        keys = np.union1d(rng.choice(image, size=max(1, len(image) // 3), replace=False), rng.integers(1, query_pos, 3))
        lo = int(rng.integers(len(attending)))
        hi = int(rng.integers(lo, len(attending)))
        heads = tuple(
            sorted(rng.choice(holder.num_heads, size=int(rng.integers(1, holder.num_heads + 1)), replace=False))
        )
        ablate = ((attending[hi], int(rng.integers(holder.num_heads))),) if i == 3 else ()
        rows.append(
            RowEdit(
                frozenset(attending[lo : hi + 1]),
                heads,
                tuple(map(int, asked)),
                tuple(map(int, keys)),
                ablate,
                ("zero", "mean")[i % 2],
            )
        )
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_every_knockout_equals_an_eager_masked_forward(load_holder, family, dummy_image):
    holder = load_holder(family)
    run = _run(holder, dummy_image)
    rng = np.random.default_rng(sum(map(ord, family)))
    step_idx = 1
    rows = _random_rows(holder, run, step_idx, rng)
    batched = forward_outcomes(holder, run, step_idx, rows, batch_size=3)  # a batch of 3, then 1
    for row, outcome in zip(rows, batched, strict=True):
        expected = _eager_probability(holder, run, step_idx, row)
        np.testing.assert_allclose(outcome.p_token, expected, rtol=RTOL, atol=ATOL, err_msg=str(row))
    (plain,) = forward_outcomes(holder, run, step_idx, [RowEdit()])
    np.testing.assert_allclose(
        plain.p_token, _eager_probability(holder, run, step_idx, RowEdit()), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next", "gemma3", "paligemma", "qwen3_5"])
def test_the_holders_knockout_reports_what_it_blocked(load_holder, family, dummy_image):
    holder = load_holder(family)
    run = _run(holder, dummy_image, steps=2)
    width, height = dummy_image.size
    box = (0, 0, width / 2, height / 2)
    found = holder.knockout(run, 1, box=box, queries="after_image", layers=(0, holder.num_layers - 1), heads=(0, 1))
    row, _ = plan_knockout(holder, run, 1, box=box, queries="after_image", heads=(0, 1))
    assert found.p_after == pytest.approx(_eager_probability(holder, run, 1, row), rel=RTOL, abs=ATOL)
    assert found.key_positions == tuple(box_positions(run, box)) and found.heads == (0, 1)
    assert found.layers == tuple(softmax_layers(holder.model))
    assert found.relative_change == pytest.approx((found.p_after - found.p_before) / found.p_before)
    assert "blocked the box's image tokens" in found.blocked and "heads 0, 1" in found.blocked
    assert len(found.top_before) == len(found.top_after) == 5
    assert found.top_before[0][1] >= found.top_before[-1][1]


def test_a_box_blocks_its_tokens_on_every_view(load_holder):
    """A tiled family: the box's cells on the tiles and on the global view, and nothing else."""
    from conftest import noise_image

    holder = load_holder("llava_next")
    image = noise_image(200, 100)
    run = _run(holder, image, steps=1)
    box = (0, 0, 50, 50)
    positions = set(box_positions(run, box).tolist())
    for layout in run.visions:
        inside = layout.cells_overlapping(box).ravel()
        assert inside.any() and set(layout.token_positions[inside].tolist()) <= positions
        assert not set(layout.token_positions[~inside].tolist()) & positions
    assert {layout.view for layout in run.visions} == {"tiles", "global view"}


def test_an_empty_knockout_is_exactly_the_plain_probability(load_holder, dummy_image):
    holder = load_holder("qwen2_5_vl")
    run = _run(holder, dummy_image)
    for empty in (
        holder.knockout(run, 2),
        holder.knockout(run, 2, ablate_heads=[]),
        holder.knockout(run, 2, key_positions=[]),
    ):
        assert empty.p_after == empty.p_before == token_probability(holder, run, 2)
        assert empty.relative_change == 0.0 and empty.blocked == "nothing (an empty knockout)"


def test_blocking_every_key_is_a_clear_error_not_nan(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    run = _run(holder, dummy_image)
    query_pos = len(run.prompt_ids) - 1 + 1
    with pytest.raises(InputError, match="no key at all"):
        holder.knockout(run, 1, key_positions=list(range(query_pos + 1)))
    kept = holder.knockout(run, 1, key_positions=list(range(3, query_pos + 1)))  # all but the first few
    assert np.isfinite(kept.p_after) and 0 < kept.p_after <= 1
    row, _ = plan_knockout(holder, run, 1, key_positions=list(range(3, query_pos + 1)))
    assert kept.p_after == pytest.approx(_eager_probability(holder, run, 1, row), rel=RTOL, abs=ATOL)


def test_zero_heads_ablated_is_the_identity_and_one_head_is_not(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    run = _run(holder, dummy_image)
    assert holder.knockout(run, 0, ablate_heads=[]).relative_change == 0.0
    every = [(layer, head) for layer in softmax_layers(holder.model) for head in range(holder.num_heads)]
    found = holder.knockout(run, 0, ablate_heads=every, mode="mean")
    assert found.p_after != found.p_before and "mean-ablated" in found.blocked


def test_patching_an_image_with_itself_changes_nothing(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    run = _run(holder, dummy_image)
    same = holder.patch(run, dummy_image, layers=(0, holder.num_layers - 1))
    assert same.p_after == same.p_before == same.p_other
    from conftest import noise_image

    other = noise_image(*dummy_image.size, seed=5)
    patched = holder.patch(run, other, layers=(0, holder.num_layers - 1))
    assert patched.p_after != patched.p_before and patched.p_other != patched.p_before
    expected = (patched.p_after - patched.p_before) / (patched.p_other - patched.p_before)
    assert patched.toward_other == pytest.approx(expected) and np.isnan(same.toward_other)
    last = holder.num_layers - 1  # after the last layer each position only meets the norm and the head
    assert holder.patch(run, other, layers=(last, last)).p_after == patched.p_before
    with pytest.raises(InputError, match="patching needs the run's image size"):
        holder.patch(run, noise_image(400, 300))
    for bad in ([10**6], [-1], ["x"]):
        with pytest.raises(InputError, match="positions must be whole numbers"):
            holder.patch(run, other, positions=bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(box=(10, 10, 5, 20)), "empty"),
        (dict(box=(1, 2, 3)), "four numbers"),
        (dict(box=(5000, 5000, 6000, 6000)), "covers no image token"),
        (dict(layers=(0, 99)), "inclusive range"),
        (dict(heads=[99]), "heads must lie"),
        (dict(queries="everything"), "queries must be one of"),
        (dict(ablate_heads=[(0, 99)]), "ablate_heads"),
        (dict(mode="half"), "mode must be"),
    ],
)
def test_bad_knockouts_say_what_to_do(load_holder, dummy_image, bad, match):
    holder = load_holder("qwen2_vl")
    run = _run(holder, dummy_image, steps=1)
    with pytest.raises(InputError, match=match):
        holder.knockout(run, 0, **bad)


def test_the_sweep_equals_its_single_knockouts_and_the_control_avoids_the_box(load_holder):
    from causal.sweep import CONDITIONS, control_positions
    from conftest import noise_image

    holder = load_holder("qwen2_vl")
    image = noise_image(224, 168, seed=3)
    run = _run(holder, image, steps=2)
    box = (0, 0, 84, 84)
    sweep = holder.knockout_sweep(run, 1, box, window=1, draws=3, batch_size=5)
    num_layers = holder.num_layers
    assert sweep.windows.tolist() == [[layer, layer] for layer in range(num_layers)]
    assert set(sweep.changes) == set(CONDITIONS) and sweep.control.shape == (num_layers, 3)
    for layer in range(num_layers):
        single = holder.knockout(run, 1, box=box, layers=(layer, layer))
        assert sweep.changes["box_token"][layer] == pytest.approx(single.relative_change, rel=1e-4, abs=1e-7)
        image_q = holder.knockout(
            run, 1, key_positions=image_positions(holder, run), queries="question", layers=(layer, layer)
        )
        assert sweep.changes["image_question"][layer] == pytest.approx(image_q.relative_change, rel=1e-4, abs=1e-7)
    box_keys = set(box_positions(run, box).tolist())
    for region in control_positions(holder, run, box, draws=3):
        assert not set(region.tolist()) & box_keys
        assert len(region) == len(box_keys)  # one view: the same cell shape, so the same count
    assert sweep.control_tokens.tolist() == [len(box_keys)] * 3


def test_windows_are_clipped_at_the_ends():
    from causal.sweep import windows

    assert windows(5, 3).tolist() == [[0, 1], [0, 2], [1, 3], [2, 4], [3, 4]]
    assert windows(4, 9).tolist() == [[0, 3]] * 4


def test_sign_test_counts_wins_and_gives_the_binomial_tail():
    from metrics import sign_test

    assert sign_test([-1, -2, -3, 0.5], [0, 0, 0, 0]) == (3, 4, pytest.approx(5 / 16))
    assert sign_test([1, 1], [1, 1]) == (0, 0, 1.0)


def test_a_knockout_with_its_control_blocks_as_many_tokens_elsewhere(load_holder, dummy_image):
    from causal.sweep import knockout_with_control

    holder = load_holder("qwen2_vl")
    run = _run(holder, dummy_image, steps=1)
    keys = image_positions(holder, run)[:4]
    found, control = knockout_with_control(holder, run, 0, keys, draws=5)
    assert found.key_positions == tuple(keys) and control.shape == (5,) and np.isfinite(control).all()
    assert len(set(control.tolist())) > 1  # different random sets, different effects
    whole, none = knockout_with_control(holder, run, 0, image_positions(holder, run))
    assert none.shape == (0,) and whole.p_after != whole.p_before


def test_a_batch_that_runs_out_of_memory_is_split_and_gives_the_same_answers(load_holder, dummy_image, monkeypatch):
    holder = load_holder("qwen2_vl")
    run = _run(holder, dummy_image)
    rows = _random_rows(holder, run, 1, np.random.default_rng(0))
    whole = forward_outcomes(holder, run, 1, rows, batch_size=4)
    forward, sizes = holder.model.forward, []

    def small_only(*args, **kwargs):
        batch = kwargs["input_ids"].shape[0]
        sizes.append(batch)
        if batch > 1:
            raise torch.OutOfMemoryError("simulated")
        return forward(*args, **kwargs)

    monkeypatch.setattr(holder.model, "forward", small_only)
    split = forward_outcomes(holder, run, 1, rows, batch_size=4)
    assert sizes == [4, 2, 1, 1, 1, 1] and [o.p_token for o in split] == pytest.approx([o.p_token for o in whole])
    monkeypatch.setattr(holder.model, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(MemoryError, match="Out of memory replaying one knockout"):
        forward_outcomes(holder, run, 1, rows[:1])


@pytest.mark.parametrize("family", ["llava_next", "internvl", "idefics3"])
def test_controls_on_tiled_families_never_touch_the_box_on_any_view(load_holder, family):
    from causal.positions import grid_cell_positions
    from causal.sweep import control_positions
    from conftest import noise_image

    holder = load_holder(family)
    run = _run(holder, noise_image(200, 100), steps=1)
    box = (0, 0, 60, 60)
    box_keys = set(box_positions(run, box).tolist())
    regions = control_positions(holder, run, box, draws=16, seed=1)
    assert all(len(region) and not set(region.tolist()) & box_keys for region in regions)
    assert len({tuple(region.tolist()) for region in regions}) > 1  # drawn without repeating one place
    cells = grid_cell_positions(run, [(0, 0)])  # a main-view cell blocks its overlap on every view
    assert {layout.view for layout in run.visions if set(layout.token_positions.tolist()) & set(cells.tolist())} == {
        layout.view for layout in run.visions
    }


def test_a_sweep_over_linear_attention_layers_marks_them_not_blocked(load_holder, dummy_image):
    holder = load_holder("qwen3_5")
    run = _run(holder, dummy_image, steps=1)
    width, height = dummy_image.size
    sweep = holder.knockout_sweep(run, 0, (0, 0, width / 2, height / 2), window=1, draws=2)
    attending = set(softmax_layers(holder.model))
    for layer in range(holder.num_layers):
        assert np.isnan(sweep.changes["box_token"][layer]) == (layer not in attending)
    assert np.isfinite(sweep.control[sorted(attending)]).all()


def test_a_sweep_takes_the_model_lock_per_forward_and_stops_when_the_model_changes(load_holder, tiny_model_dirs):
    from types import SimpleNamespace

    from conftest import noise_image
    from errors import ModelMismatchError
    from pictures.stored_run import ViewSettings
    from pipeline import ModelSlot, knockout_layers

    holder = load_holder("qwen2_vl")
    run = _run(holder, noise_image(224, 168, seed=3), steps=1)
    entered, seen = [], []

    class Counting:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    sweep = holder.knockout_sweep(run, 0, (0, 0, 84, 84), window=1, draws=2, batch_size=4, guard=Counting)
    rows = holder.num_layers * (3 + 2)
    assert len(entered) == 1 + -(-rows // 4) and sweep.control.shape == (holder.num_layers, 2)  # the lock per forward

    slot = ModelSlot()
    slot.holder = holder
    stored = SimpleNamespace(run=run)
    settings = ViewSettings(step_idx=0, target_box=(0, 0, 84, 84))

    def swap_model(done, total):  # another user loads a model while the sweep runs
        seen.append(done)
        slot.holder = None

    with pytest.raises(ModelMismatchError, match="changed during the layer sweep"):
        knockout_layers(slot, stored, settings, window=1, progress=swap_model)
    assert len(seen) == 1


def test_a_layer_that_never_reaches_the_recording_function_is_an_error_not_a_silent_no_op(load_holder, dummy_image):
    from errors import CaptureError

    holder = load_holder("qwen2_vl")
    run = _run(holder, dummy_image, steps=1)
    query_pos = len(run.prompt_ids) - 1
    with pytest.raises(CaptureError, match="never ran through the recording attention function"):
        forward_outcomes(holder, run, 0, [RowEdit(frozenset({999}), None, (query_pos,), (1, 2))])
