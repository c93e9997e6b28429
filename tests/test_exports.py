"""Exports run beside the renders: a pool of their own, one per session at a time, yielding between chunks,
and animations capped in frames."""

import os
import statistics
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image

import app
from config import AppConfig
from conftest import free_port, noise_image
from errors import InputError
from exports import ExportLane, clean_folder
from pipeline import ModelSlot, RunStore
from ui.handlers import Handlers

VIEW = [0, 0, 2, 0, 3, "mean", "minmax", "jet", 0.5, "overlay", False]


@pytest.fixture
def handlers(tiny_model_dirs, tmp_path):
    slot = ModelSlot()
    slot.load(str(tiny_model_dirs["qwen2_vl"]), "cpu", "float32")
    slot.holder.model.generation_config.min_new_tokens = 512  # every answer as long as asked
    cfg = AppConfig(outputs_dir=tmp_path / "outputs", animation_max_frames=24, export_workers=2)
    return Handlers(cfg, slot, RunStore(2048))


def _run(handlers, tmp_path, tokens: int, seed: int, session: str) -> str:
    path = tmp_path / f"in{seed}.png"
    noise_image(320, 240, seed=seed).save(path)
    request = SimpleNamespace(session_hash=session)
    *_, last = handlers.generate(str(path), "Hi", tokens, False, 0.7, 0.9, 0, 0, *VIEW, None, None, request=request)
    return last[0]


def test_a_long_answer_is_animated_every_kth_token(handlers, tmp_path):
    run_id = _run(handlers, tmp_path, 60, 0, "a")
    gif = handlers.download_animation(run_id, *VIEW, request=SimpleNamespace(session_hash="a"))
    with Image.open(gif) as animation:
        assert animation.n_frames == 20  # 60 tokens over at most 24 frames: every 3rd token
    short = _run(handlers, tmp_path, 10, 1, "a")
    with Image.open(handlers.download_animation(short, *VIEW)) as animation:
        assert animation.n_frames == 10  # within the cap: every token


def test_one_export_per_session_at_a_time():
    lane, entered, release = ExportLane(workers=2), threading.Event(), threading.Event()

    def hold():
        with lane.export("mine"):
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    entered.wait(10)
    with pytest.raises(InputError, match="still being written"):
        with lane.export("mine"):
            pass
    with lane.export("other"):  # another session is not held up
        pass
    release.set()
    worker.join(10)
    with lane.export("mine"):  # and the session may export again once it is done
        pass


def test_a_second_export_of_a_session_is_refused_with_a_message(handlers, tmp_path):
    run_id = _run(handlers, tmp_path, 4, 2, "b")
    with handlers.exports.export("b"):  # one of b's exports is being written
        with pytest.raises(gr.Error, match="still being written"):
            handlers.export_attention(run_id, request=SimpleNamespace(session_hash="b"))
        paths = handlers.export_attention(run_id, request=SimpleNamespace(session_hash="c"))
    assert len(paths) == 2


def test_another_users_render_stays_quick_while_four_exports_run(tiny_model_dirs, tmp_path):
    """Four users export animations through the server while a fifth moves through tokens: the fifth's
    renders (queue wait included) against the same renders with nothing else running."""
    from gradio_client import Client, handle_file

    slot = ModelSlot()
    slot.load(str(tiny_model_dirs["qwen2_vl"]), "cpu", "float32")
    slot.holder.model.generation_config.min_new_tokens = 512
    cfg = AppConfig(outputs_dir=tmp_path / "outputs", animation_max_frames=48)
    demo = app.build_ui(cfg, slot, RunStore(2048))
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        clients = [Client(url, verbose=False, download_files=False) for _ in range(5)]
        for i, client in enumerate(clients):
            path = tmp_path / f"user{i}.png"
            noise_image(320, 240, seed=i).save(path)
            tokens = 8 if i == 0 else 160
            client.predict(handle_file(str(path)), "Hi", tokens, False, 0.7, 0.9, 0, 0, 0, api_name="/generate")
        viewer, exporters = clients[0], clients[1:]

        def renders(count: int) -> list[float]:
            times = []
            for step in range(count):
                start = time.perf_counter()
                viewer.predict(step % 8, api_name="/render")
                times.append(time.perf_counter() - start)
            return times

        renders(3)  # warm
        alone = statistics.median(renders(9))
        jobs = [client.submit(api_name="/download_animation") for client in exporters]
        time.sleep(1.0)  # the exports are under way
        busy_times = renders(9)
        busy = statistics.median(busy_times)
        running = sum(not job.done() for job in jobs)
        for job in jobs:
            job.result(timeout=300)
        print(f"render alone {alone * 1000:.0f} ms, with four exports {busy * 1000:.0f} ms ({busy / alone:.2f}x)")
        assert running >= 2  # measured while exports ran
        assert busy < 1.0 and busy / alone < 4.0
        assert max(busy_times) < 3.0  # none waited for an export to finish (one takes seconds here)
    finally:
        demo.close()


def test_exports_have_workers_of_their_own(tmp_path):
    demo = app.build_ui(AppConfig(outputs_dir=tmp_path), ModelSlot(), RunStore(64))
    groups = {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values() if fn.api_name}
    for name in ("download_png", "download_animation", "export_attention", "gallery_zip"):
        assert groups[name] == ("export", 2)
    assert groups["render"][0] == "render" and groups["generate"][0] == "generate"


def _aged(path, seconds: float, size: int = 100_000):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))
    return path


def test_old_files_and_files_over_budget_go_young_ones_stay(tmp_path):
    old = _aged(tmp_path / ("a" * 64) / "image.png", 4000)
    recent = [_aged(tmp_path / f"{i:064x}" / "image.png", 1000 - i * 100) for i in range(5)]  # 1000 s .. 600 s
    young = _aged(tmp_path / ("b" * 64) / "image.png", 5)
    assert clean_folder(tmp_path, max_mb=0.3, max_age_s=3600, grace_s=60) == 4  # the old one, then 3 oldest
    left = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert left == {recent[3], recent[4], young}
    assert not old.parent.exists()  # its emptied folder too
    assert clean_folder(tmp_path, max_mb=0.0, grace_s=60) == 2 and young.exists()  # never the youngest


def test_the_app_cleans_its_cache_and_outputs_on_a_timer(tmp_path, monkeypatch):
    cache, outputs = tmp_path / "cache", tmp_path / "outputs"
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    cfg = AppConfig(outputs_dir=outputs, cache_dir=cache, cache_max_age_s=30, outputs_max_mb=0)
    assert app.use_cache_dir(cfg) == cache and os.environ["GRADIO_TEMP_DIR"] == str(cache)
    stale = [_aged(cache / f"{i:064x}" / "image.jpeg", 100) for i in range(3)]  # uploads and pictures
    export = _aged(outputs / "attention-animation-1.gif", 1000)
    fresh = _aged(cache / ("c" * 64) / "image.jpeg", 0)
    assert app.cleaning_period(cfg) == 15.0  # half the age limit
    janitor = app.start_cleaning(cfg, cache, every_s=0.1)  # the same timer, sped up
    try:
        deadline = time.monotonic() + 30
        while (export.exists() or any(p.exists() for p in stale)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        janitor.stop()
    assert not any(p.exists() for p in stale) and not export.exists()
    assert fresh.exists()


def test_concurrent_exports_against_a_tiny_budget_all_keep_their_files(handlers, tmp_path):
    """With outputs/ budgeted at 0 MB, 16 sessions exporting at once each still find their own files:
    pruning never removes a file younger than its grace period (another user's export being written)."""
    run_id = _run(handlers, tmp_path, 6, 7, "s")
    handlers = Handlers(replace(handlers.cfg, outputs_max_mb=0, export_workers=16), handlers.slot, handlers.store)
    found, failures = [], []

    def export(i: int):
        try:
            found.append(handlers.export_attention(run_id, request=SimpleNamespace(session_hash=f"user{i}")))
        except Exception as err:
            failures.append(repr(err))

    threads = [threading.Thread(target=export, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == [] and len(found) == 16
    assert all(os.path.exists(path) for paths in found for path in paths)  # none pruned under anyone
