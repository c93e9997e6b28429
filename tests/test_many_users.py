"""Many users at once, bounded memory over many sessions, and recovery from out-of-memory."""

import threading
import time

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

import app
from config import AppConfig
from conftest import free_port
from errors import GenerationOutOfMemoryError
from pictures.views import as_text
from pipeline import ModelSlot, RunStore

VIEW = [0, 0, 2, 0, 3, "mean", "minmax", "jet", 0.5, "overlay", False]


class _ConcurrencyMeter:
    """Wraps holder.generate to record how many generations overlap, optionally slowing them."""

    def __init__(self, holder, delay: float = 0.0):
        self.inner, self.delay = holder.generate, delay
        self.active = self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(self.delay)
            return self.inner(*args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture
def served(tiny_model_dirs, tmp_path):
    cfg = AppConfig(outputs_dir=tmp_path / "outputs")
    slot = ModelSlot()
    slot.load(str(tiny_model_dirs["qwen2_vl"]), "cpu", "float32")
    demo = app.build_ui(cfg, slot, RunStore(cfg.session_cache_mb))
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    yield f"http://127.0.0.1:{port}/", slot
    demo.close()


def _image_file(folder, seed: int) -> str:
    path = folder / f"user{seed}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_eight_users_three_rounds_each(served, tmp_path):
    from gradio_client import Client, handle_file

    url, slot = served
    meter = _ConcurrencyMeter(slot.holder)
    slot.holder.generate = meter
    failures, timings = [], []

    def user(idx: int):
        try:
            client = Client(url, verbose=False)
            for round_idx in range(3):
                prompt = f"user {idx} round {round_idx}: what is this?"
                start = time.perf_counter()
                answer, dropdown, _, picture, caption, *_ = client.predict(
                    handle_file(_image_file(tmp_path, idx)),
                    prompt,
                    3,
                    False,
                    0.7,
                    0.9,
                    0,
                    0,
                    *VIEW,
                    api_name="/generate",
                )
                tokens = [choice[0] for choice in dropdown["choices"]]
                rendered = client.predict(len(tokens) - 1, *VIEW[1:], api_name="/render")
                timings.append(time.perf_counter() - start)
                # The render sees this session's own last token, not another user's.
                assert rendered[1].startswith(f"Token {len(tokens) - 1} "), rendered[1]
                assert as_text(tokens[-1].split(": ", 1)[1]) in rendered[1]  # shown literally
        except Exception as err:  # collected and asserted below
            failures.append(f"user {idx}: {err!r}")

    threads = [threading.Thread(target=user, args=(idx,)) for idx in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    assert len(timings) == 24
    assert meter.peak == 1  # generation is serialised
    print(f"8 users x 3 rounds: median round {np.median(timings):.2f} s, slowest {max(timings):.2f} s")


def test_rendering_is_not_blocked_by_another_users_generation(served, tmp_path):
    from gradio_client import Client, handle_file

    url, slot = served
    viewer = Client(url, verbose=False)
    viewer.predict(
        handle_file(_image_file(tmp_path, 1)), "first", 2, False, 0.7, 0.9, 0, 0, *VIEW, api_name="/generate"
    )
    slot.holder.generate = _ConcurrencyMeter(slot.holder, delay=4.0)  # a slow generation
    generator = Client(url, verbose=False)
    job = generator.submit(
        handle_file(_image_file(tmp_path, 2)), "slow", 2, False, 0.7, 0.9, 0, 0, *VIEW, api_name="/generate"
    )
    time.sleep(1.0)  # the slow generation is running
    start = time.perf_counter()
    rendered = viewer.predict(*VIEW, api_name="/render")
    render_seconds = time.perf_counter() - start
    assert "Token 0" in rendered[1]
    assert not job.done() and render_seconds < 2.5
    job.result(timeout=60)


def test_memory_levels_off_over_a_hundred_sessions(tiny_model_dirs, tmp_path):
    cap_mb = 1.0
    h = app.Handlers(AppConfig(outputs_dir=tmp_path), ModelSlot(), RunStore(cap_mb))
    h.load_model(str(tiny_model_dirs["qwen2_vl"]))
    image = _image_file(tmp_path, 0)
    process, rss_mb = psutil.Process(), []
    for session in range(100):
        *_, last = h.generate(image, f"session {session}", 4, False, 0.7, 0.9, 0, 0, *VIEW, None, None)
        assert h.store.total_bytes <= cap_mb * 2**20
        if session % 10 == 9:
            rss_mb.append(process.memory_info().rss / 2**20)
    print(
        "RSS every 10 sessions (MB):",
        " ".join(f"{v:.0f}" for v in rss_mb),
        f"| kept: {len(h.store)} runs, {h.store.total_bytes / 2**20:.2f} MB",
    )
    assert rss_mb[-1] - rss_mb[2] < 40  # flat after warm-up


def test_out_of_memory_is_freed_reported_and_the_next_request_works(load_holder, dummy_image, monkeypatch, tmp_path):
    holder = load_holder("qwen2_vl")
    real_generate, calls = holder.model.generate, []

    def exploding_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(holder.model, "generate", exploding_generate)
    with pytest.raises(GenerationOutOfMemoryError, match="Lower the image-token budget"):
        holder.generate(dummy_image, "Hi", max_new_tokens=2)
    assert holder.model.config.get_text_config()._attn_implementation == "sdpa"  # capture was removed
    assert holder.generate(dummy_image, "Hi", max_new_tokens=2).num_steps >= 1

    import gradio as gr

    slot = ModelSlot()
    slot.holder = holder
    h = app.Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(100))
    calls.clear()
    with pytest.raises(gr.Error, match="Out of memory"):
        list(h.generate(str(_image_file(tmp_path, 3)), "Hi", 2, False, 0.7, 0.9, 0, 0, *VIEW, None, None))
    *_, last = h.generate(str(_image_file(tmp_path, 3)), "Hi", 2, False, 0.7, 0.9, 0, 0, *VIEW, None, None)
    assert last[0] in [key for key in h.store._runs]


def test_a_generation_its_client_abandons_stops_and_frees_the_model(load_holder, dummy_image, monkeypatch):
    """Closing the stream (Gradio does when a client cancels or leaves) stops generating at the next token."""
    from pipeline import ModelSlot, stream_generation

    slot, holder = ModelSlot(), load_holder("qwen2_vl")
    slot.holder = holder
    finished_runs, generate = [], holder.generate

    def spy(*args, **kwargs):
        finished_runs.append(generate(*args, **kwargs))
        return finished_runs[-1]

    monkeypatch.setattr(holder, "generate", spy)
    threads_before = threading.active_count()
    stream = stream_generation(slot, [dummy_image], "Describe it.", 1000, min_new_tokens=1000)
    assert isinstance(next(stream), str)  # generating, lock held
    stream.close()  # the client went away
    with slot.lock:  # the worker let go of the model
        assert len(finished_runs) == 1 and finished_runs[0].num_steps < 100  # not the 1000 asked for
    deadline = time.monotonic() + 10
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads_before  # no worker left behind
    finished = list(stream_generation(slot, [dummy_image], "Hi", 3, min_new_tokens=3))
    assert finished[-1].num_steps == 3  # the next user is served


def test_a_client_that_cancels_through_the_queue_stops_its_generation(tiny_model_dirs, tmp_path):
    from gradio_client import Client, handle_file

    from pipeline import ModelSlot, RunStore

    slot = ModelSlot()
    slot.load(str(tiny_model_dirs["qwen2_vl"]), "cpu", "float32")
    slot.holder.model.generation_config.min_new_tokens = 500  # uncancelled, it would run all 500
    steps, generate = [], slot.holder.generate

    def spy(*args, **kwargs):
        run = generate(*args, **kwargs)
        steps.append(run.num_steps)
        return run

    slot.holder.generate = spy
    demo = app.build_ui(AppConfig(outputs_dir=tmp_path / "outputs"), slot, RunStore(512))
    demo.queue()
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    try:
        image = tmp_path / "in.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(image)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit(
            handle_file(str(image)), "Describe it.", 500, False, 0.7, 0.9, 0, 0, 0, api_name="/generate"
        )
        deadline = time.monotonic() + 60
        while not job.outputs() and time.monotonic() < deadline:  # the answer has started streaming
            time.sleep(0.05)
        sessions = list(slot._generations)  # the request reached the handler
        job.cancel()
        with slot.lock:  # the worker let go of the model
            assert len(steps) == 1 and steps[0] < 100  # not the 500 tokens asked for
        assert sessions == [client.session_hash]
    finally:
        demo.close()


def test_asking_again_stops_the_sessions_own_running_generation_only(tiny_model_dirs, tmp_path):
    """A session's Generate click stops its old generation (unqueued), never another session's."""
    from types import SimpleNamespace

    from ui.handlers import Handlers

    slot = ModelSlot()
    slot.load(str(tiny_model_dirs["qwen2_vl"]), "cpu", "float32")
    slot.holder.model.generation_config.min_new_tokens = 2000  # unstopped, it would run all 2000
    h = Handlers(AppConfig(outputs_dir=tmp_path / "outputs"), slot, RunStore(512))
    image = _image_file(tmp_path, 1)
    mine, other = SimpleNamespace(session_hash="mine"), SimpleNamespace(session_hash="other")
    results = {}

    def run(name, request):
        *_, last = h.generate(image, "Describe it.", 2000, False, 0.7, 0.9, 0, 0, *VIEW, None, None, request=request)
        results[name] = h.store.get(last[0]).run.num_steps

    worker = threading.Thread(target=run, args=("old", mine))
    worker.start()
    deadline = time.monotonic() + 60
    while "mine" not in slot._generations and time.monotonic() < deadline:
        time.sleep(0.01)
    h.stop_generation(other)  # someone else's click: no effect
    time.sleep(0.3)
    assert not slot._generations["mine"].is_set()
    h.stop_generation(mine)  # this session asks again
    worker.join(60)
    assert not worker.is_alive() and results["old"] < 2000  # stopped early, not 2000 tokens
    assert slot._generations == {}  # nothing left registered
    first, second = slot.begin("s"), slot.begin("s")  # a new generation of the session
    assert first.is_set() and not second.is_set()  # stops the one before it


def test_a_sessions_new_generation_replaces_its_running_and_waiting_ones(tiny_model_dirs, tmp_path):
    """One API client submits three generations in a row: the first is stopped, the second never runs to its
    end, the third is answered; the model ran one generation at a time throughout."""
    from gradio_client import Client, handle_file

    slot = ModelSlot()
    slot.load(str(tiny_model_dirs["qwen2_vl"]), "cpu", "float32")
    slot.holder.model.generation_config.min_new_tokens = 500  # unstopped, each would run all it asks for
    meter = _ConcurrencyMeter(slot.holder)
    steps, generate = [], meter

    def spy(*args, **kwargs):
        run = generate(*args, **kwargs)
        steps.append(run.num_steps)
        return run

    slot.holder.generate = spy
    store = RunStore(512)
    demo = app.build_ui(AppConfig(outputs_dir=tmp_path / "outputs"), slot, store)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    try:
        image = handle_file(_image_file(tmp_path, 3))
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)

        def ask(tokens: int):
            return client.submit(image, "Describe it.", tokens, False, 0.7, 0.9, 0, 0, 0, api_name="/generate")

        first = ask(500)
        deadline = time.monotonic() + 60
        while not first.outputs() and time.monotonic() < deadline:  # the first answer is streaming
            time.sleep(0.05)
        running = slot._generations[client.session_hash]
        second = ask(500)
        while not running.is_set() and time.monotonic() < deadline:  # the second reached its handler
            time.sleep(0.01)
        third = ask(3)
        third.result(timeout=120)  # answered
        first.result(timeout=120)  # stopped early, with the answer so far
        try:
            second.result(timeout=120)
            ran = 3  # it started, and the third stopped it
        except Exception as err:
            assert "replaced this one before it started" in str(err)
            ran = 2
        assert len(steps) == ran and steps[-1] == 3  # the newest is answered in full
        assert all(n < 500 for n in steps[:-1]) and meter.peak == 1  # the others stopped early, one at a time
        assert all(n < 500 for n in steps) and meter.peak == 1
    finally:
        demo.close()


def test_a_long_model_map_computation_lets_go_of_the_model_between_turns(load_holder, tmp_path, monkeypatch):
    """A render asking for many tokens' cell-knockout maps (model passes) holds the model's lock for a few
    tokens at a time, so another user's generation runs between the turns instead of after all of them."""
    import pipeline
    from pictures.stored_run import StoredRun
    from ui.controls import ViewControls, defaults
    from ui.handlers import Handlers

    slot = ModelSlot()
    slot.holder = load_holder("qwen2_vl")
    monkeypatch.setattr(slot.holder.model.generation_config, "min_new_tokens", 10)  # the holder is shared
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(256))
    image = _image_file(tmp_path, 5)
    *_, last = handlers.generate(image, "Hi", 10, False, 0.7, 0.9, 0, 0, *VIEW, None, None)
    turns, inner = [], pipeline.compute_maps

    def counted(name, request):
        turns.append(len(request.steps))
        return inner(name, request)

    monkeypatch.setattr(pipeline, "compute_maps", counted)
    values = {**defaults(ViewControls), "layer_hi": 2, "head_hi": 3, "method": "cell_knockout", "tokens": "0-9"}
    picture, caption, _ = handlers.render(last[0], *values.values())
    assert turns == [4, 4, 2]  # ten tokens' maps in three holds of the lock
    assert "Tokens 0, 1, 2" in caption and isinstance(handlers.store.get(last[0]), StoredRun)


def test_memory_a_large_request_used_is_given_back():
    """glibc keeps freed heap pages for reuse, so a process that once peaked stayed near its peak (7.1 GB
    after one large request); `release_memory`, run after every generation, hands them back."""
    import ctypes.util

    from pipeline import release_memory

    if not ctypes.util.find_library("c") or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim"):
        pytest.skip("this C library has no malloc_trim")
    process = psutil.Process()
    release_memory()
    idle = process.memory_info().rss
    blocks = [np.ones(4_000) for _ in range(20_000)]  # 32 KB each, under mmap's threshold: 640 MB of heap
    kept = blocks[::50]  # a few survive, so the heap cannot shrink from its top by itself
    del blocks
    held = process.memory_info().rss - idle
    release_memory()
    back = process.memory_info().rss - idle
    print(f"after the request {held / 2**20:.0f} MB over idle, after release {back / 2**20:.0f} MB")
    assert held > 300 * 2**20  # the allocator kept it
    assert back < 100 * 2**20 and len(kept) == 400  # given back, all but what is still in use
