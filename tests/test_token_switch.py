"""Speed after generation, kept exact: a store's maps of many tokens at once equal each token's own rows,
keys in a narrow dtype are converted into one reused buffer, the idle prefetch keeps the next tokens'
rows, an animation or a shared scale maps the answer in one pass per layer, and where a store lives is
decided by the budget."""

import time

import numpy as np
import pytest
import torch

import attention_store
from analysis import region_share, region_to_text
from attention_processor import _heatmap, step_rows, token_heatmap, token_heatmaps
from attention_store import DeviceLedger, LayerRecord, QueryKeyStore, placement
from conftest import noise_image
from errors import InputError
from pictures.stored_run import StoredRun, ViewSettings
from pictures.views import animation_frames
from records import AttentionRun, VisionLayout
from testing.tiny_models import FAMILIES

TOLERANCE = dict(rtol=2e-3, atol=2e-6)


def _kwargs(holder, n: int) -> dict:
    return dict(max_new_tokens=n, min_new_tokens=n, suppress_tokens=[holder.model.config.image_token_id])


def _reference(run: AttentionRun, step: int, layers, heads, reduce: str, renormalize: bool) -> np.ndarray:
    """The map from the token's own rows, one token at a time, as the app computed it before."""
    return _heatmap(run.vision, step_rows(run, step, layers, heads), reduce, renormalize)


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_of_many_tokens_at_once_equal_each_tokens_own_rows(load_holder, family):
    holder = load_holder(family)
    image, prompt = noise_image(120, 90, seed=4), "Where is the red circle?"
    eager = holder.generate(image, prompt, method="eager", **_kwargs(holder, 5))
    run = holder.generate(image, prompt, store="qk", **_kwargs(holder, 5))
    assert run.generated_ids == eager.generated_ids
    last_layer, last_head = run.layer_indices[-1], run.num_heads - 1
    ranges = [
        (None, None),
        ((run.layer_indices[0], run.layer_indices[0]), (1, last_head - 1)),  # heads across KV groups
        ((run.layer_indices[-2] if len(run.layer_indices) > 1 else last_layer, last_layer), (last_head, last_head)),
    ]
    for layers, heads in ranges:
        for reduce in ("mean", "max", "min"):
            for renormalize in (False, True):
                batched = token_heatmaps(run, range(run.num_steps), layers, heads, reduce, renormalize)
                from_rows = token_heatmaps(eager, range(run.num_steps), layers, heads, reduce, renormalize)
                for t in range(run.num_steps):
                    expected = _reference(eager, t, layers, heads, reduce, renormalize)
                    np.testing.assert_allclose(batched[t], expected, **TOLERANCE)
                    np.testing.assert_allclose(from_rows[t], expected, rtol=1e-5, atol=1e-7)  # a row store
                    one = token_heatmap(run, t, layers, heads, reduce, renormalize)  # cached or computed alone
                    np.testing.assert_allclose(one, expected, **TOLERANCE)


def _bf16_run(softcap: float | None = None, masked: bool = False, steps: int = 6) -> tuple[AttentionRun, list]:
    """A query-key store in bfloat16 (the keys are converted into the store's float32 buffer), with a grouped
    query layout and a model mask, and the float64 softmax rows it must reproduce."""
    generator = torch.Generator().manual_seed(1)
    num_layers, num_heads, num_kv, head_dim, prompt_len = 3, 6, 2, 16, 30
    layers, expected = [], []
    for _ in range(num_layers):
        queries = (torch.randn(num_heads, steps, head_dim, generator=generator) * 2).bfloat16()
        keys = (torch.randn(num_kv, prompt_len + steps - 1, head_dim, generator=generator) * 2).bfloat16()
        allowed = None
        if masked:  # the model hid some keys (padding at the start)
            allowed = torch.ones(steps, prompt_len + steps - 1, dtype=torch.bool)
            allowed[:, :3] = False
        layers.append(LayerRecord(queries, keys, head_dim**-0.5, allowed, softcap))
        scores = torch.einsum(
            "hnd,hkd->hnk", queries.double(), keys.double().repeat_interleave(num_heads // num_kv, 0)
        ) * (head_dim**-0.5)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        per_step = []
        for t in range(steps):
            row = scores[:, t, : prompt_len + t]
            if masked:
                row = row.masked_fill(~allowed[t, : prompt_len + t], float("-inf"))
            per_step.append(torch.softmax(row, -1))
        expected.append(per_step)
    store = QueryKeyStore(layers, torch.arange(prompt_len - 1, prompt_len - 1 + steps), 0, prompt_len, {})
    layout = VisionLayout(np.arange(5, 25), (4, 5), (50, 40), (0.0, 0.0, 50.0, 40.0), (40, 50))
    run = AttentionRun([0] * prompt_len, list(range(steps)), ["x"] * steps, layout, [0, 1, 2], num_heads, store)
    return run, expected


@pytest.mark.parametrize("softcap, masked", [(None, False), (30.0, True)])
def test_narrow_keys_are_converted_into_one_reused_buffer_and_stay_exact(softcap, masked):
    run, expected = _bf16_run(softcap, masked)
    store = run.attention
    for t in range(run.num_steps):
        rows = run.step_attention(t).double()  # (L, H, prompt_len + t)
        for layer in range(3):
            torch.testing.assert_close(rows[layer], expected[layer][t], rtol=2e-3, atol=1e-6)
    buffers = list(store._buffers.values())
    assert len(buffers) == 1 and buffers[0].dtype == torch.float32
    assert buffers[0].numel() == store.layers[0].keys.numel()  # one layer's keys, reused by every layer
    batched = token_heatmaps(run, range(run.num_steps), heads=(1, 4), reduce="mean")
    for t in range(run.num_steps):
        values = torch.stack([expected[layer][t][1:5, 5:25] for layer in range(3)])  # (L, h, cells)
        np.testing.assert_allclose(batched[t].ravel(), values.mean(dim=(0, 1)).numpy(), rtol=2e-3, atol=1e-6)


def test_a_store_that_prefetches_keeps_the_next_tokens_rows_when_idle():
    run, _ = _bf16_run(steps=8)
    store = run.attention
    store.prefetch = True
    done = attention_store.PREFETCH.done
    token_heatmap(run, 3)
    deadline = time.monotonic() + 10
    while attention_store.PREFETCH.done == done and time.monotonic() < deadline:
        time.sleep(0.02)
    assert {4, 5, 2} <= set(store._cache)  # the neighbours, computed together while nothing else asked
    assert next(reversed(store._cache)) == 3  # the row viewed stays the most recent
    prefetched = run.step_attention(4).clone()
    store.prefetch = False
    store._cache.clear()
    torch.testing.assert_close(run.step_attention(4), prefetched, rtol=0, atol=0)  # the same rows, computed alone


def test_a_prefetch_gives_way_to_a_view():
    run, _ = _bf16_run(steps=8)
    store = run.attention
    assert store.prefetch_rows([5, 6], stop=lambda: True) is False
    assert 5 not in store._cache and 6 not in store._cache  # abandoned: nothing half-made is kept


def test_an_animation_and_a_shared_scale_map_the_answer_in_one_pass_per_layer(load_holder, monkeypatch):
    holder = load_holder("qwen2_5_vl")
    run = holder.generate(noise_image(96, 64, seed=2), "Describe it.", store="qk", **_kwargs(holder, 6))
    run.attention._cache.clear()
    calls = []
    original = QueryKeyStore._layer_rows
    monkeypatch.setattr(QueryKeyStore, "_layer_rows", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    stored = StoredRun(run, images=list(run.images))
    everything = dict(layers=(0, run.layer_indices[-1]), heads=(0, run.num_heads - 1))
    settings = ViewSettings(step_idx=0, normalization="shared", **everything)
    frames = list(animation_frames(stored, settings, max_side=96))
    assert len(frames) == 6
    assert len(calls) == run.num_layers  # one pass per layer for all six tokens, not one per token
    assert max(frames[0].size) <= 96 + 200  # drawn at the frames' size (and a colour bar), not the display's
    maps_bytes = sum(heat.nbytes for kept in stored._maps.values() for heat in kept.values())
    assert maps_bytes > 0 and stored.nbytes >= run.nbytes + maps_bytes  # the kept maps are counted


def test_where_a_store_lives_follows_the_request_and_the_budget():
    ledger = DeviceLedger()
    gpu = torch.device("cuda:0")
    assert placement("auto", torch.device("cpu"), 10, None, ledger) == (False, "queries and keys on the host")
    with pytest.raises(InputError, match="runs on cpu"):
        placement("cuda", torch.device("cpu"), 10, None, ledger)
    with pytest.raises(InputError, match="Unknown store device"):
        placement("gpu", gpu, 10, None, ledger)
    assert placement("cpu", gpu, 10, 100, ledger)[0] is False
    stays, where = placement("auto", gpu, 60 * 2**20, 100, ledger)
    assert stays and "on cuda:0" in where and ledger.held == 60 * 2**20
    stays, where = placement("cuda", gpu, 60 * 2**20, 100, ledger)  # 120 MB would pass the 100 MB budget
    assert not stays and "100 MB allowed" in where and ledger.held == 60 * 2**20

    class Store:
        pass

    store = Store()
    ledger.track(store, 60 * 2**20)
    del store  # a store dropped gives its bytes back
    assert ledger.held == 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "idefics3"])
def test_a_static_cache_gives_the_same_exact_rows(load_holder, family):
    """With cache_implementation='static' the keys are one preallocated cache, longer than the answer: the
    store keeps its first prompt + answer - 1 keys, and the rows equal eager's."""
    holder = load_holder(family)
    image, prompt = noise_image(120, 90, seed=6), "What is in the picture?"
    eager = holder.generate(image, prompt, method="eager", **_kwargs(holder, 5))
    for store in ("qk", "rows"):
        run = holder.generate(image, prompt, store=store, cache_implementation="static", **_kwargs(holder, 5))
        assert run.generated_ids == eager.generated_ids
        if store == "qk":
            assert run.attention.layers[0].keys.shape[1] == len(run.prompt_ids) + run.num_steps - 1
        for t in range(run.num_steps):
            torch.testing.assert_close(run.step_attention(t).float(), eager.step_attention(t).float(), **TOLERANCE)
        np.testing.assert_allclose(
            token_heatmaps(run, range(run.num_steps))[-1],
            _reference(eager, run.num_steps - 1, None, None, "mean", False),
            **TOLERANCE,
        )


def test_keys_viewed_out_of_a_longer_cache_are_copied_when_the_store_keeps_them():
    cache = torch.randn(2, 40, 8)
    record = LayerRecord(torch.randn(4, 3, 8), cache[:, :30], 0.3)
    kept = attention_store._narrowed(record)
    assert kept.keys.untyped_storage().nbytes() == 2 * 30 * 8 * 4  # its own keys only, not the whole cache
    assert torch.equal(kept.keys, cache[:, :30])
    whole = LayerRecord(torch.randn(4, 3, 8), torch.randn(2, 30, 8), 0.3)
    assert attention_store._narrowed(whole).keys is whole.keys  # no copy when nothing more is held


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "internvl"])
def test_region_shares_over_the_whole_answer_come_from_one_pass_and_equal_each_tokens_rows(load_holder, family):
    holder = load_holder(family)
    image, prompt = noise_image(110, 80, seed=8), "What is on the left?"
    eager = holder.generate(image, prompt, method="eager", **_kwargs(holder, 5))
    run = holder.generate(image, prompt, store="qk", **_kwargs(holder, 5))
    region = np.zeros(run.vision.grid_hw, dtype=bool)
    region[:, : max(1, run.vision.grid_hw[1] // 2)] = True
    run.step_attention(2)  # one token cached, the others computed together
    got = region_to_text(run, region)
    expected = np.stack([region_share(eager, t, region) for t in range(eager.num_steps)])  # (T, L, H)
    np.testing.assert_allclose(got["per_head"], expected.mean(axis=0), rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(got["per_step"], expected.mean(axis=(1, 2)), rtol=2e-3, atol=1e-5)
