"""What the server exposes: auth on every route, only its own files, capped uploads, safe defaults."""

from dataclasses import replace

import httpx
import pytest

import app
from config import AppConfig
from conftest import free_port
from pipeline import ModelSlot, RunStore


@pytest.fixture
def launched(tmp_path, request):
    auth = getattr(request, "param", None)
    cfg = replace(AppConfig(outputs_dir=tmp_path / "outputs", max_upload="1mb"), port=free_port(), auth=auth)
    cfg.outputs_dir.mkdir()
    (cfg.outputs_dir / "result.png").write_bytes(b"\x89PNG fake")
    demo = app.build_ui(cfg, ModelSlot(), RunStore(10))
    demo.queue()
    demo.launch(**app.launch_options(cfg), prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{cfg.port}", cfg
    demo.close()


@pytest.mark.parametrize("launched", [("alice", "s3cret")], indirect=True)
def test_auth_protects_api_files_and_config(launched):
    url, cfg = launched
    routes = [
        ("GET", "/config"),
        ("GET", "/gradio_api/info"),
        ("GET", f"/gradio_api/file={cfg.outputs_dir}/result.png"),
        ("POST", "/gradio_api/upload"),
        ("POST", "/gradio_api/queue/join"),
        ("POST", "/gradio_api/call/render"),
        ("POST", "/gradio_api/call/generate"),
    ]
    with httpx.Client(base_url=url, timeout=10) as client:
        for method, route in routes:
            response = client.request(method, route, json={} if method == "POST" else None)
            assert response.status_code == 401, (route, response.status_code)
        login = client.post("/login", data={"username": "alice", "password": "s3cret"})
        assert login.status_code == 200
        assert client.get("/gradio_api/info").status_code == 200  # with credentials it works


@pytest.mark.parametrize("launched", [("alice", "s3cret")], indirect=True)
def test_routes_that_act_on_a_job_need_the_login(launched):
    url, cfg = launched
    routes = [
        ("POST", "/gradio_api/cancel", {"session_hash": "someone", "fn_index": 0, "event_id": "x"}),
        ("POST", "/gradio_api/reset", {"session_hash": "someone", "fn_index": 0, "event_id": "x"}),
        ("GET", "/gradio_api/heartbeat/someone", None),
        ("GET", "/gradio_api/queue/data?session_hash=someone", None),
        ("GET", f"/gradio_api/file={cfg.outputs_dir}/result.png", None),
        ("GET", "/gradio_api/info", None),
    ]
    with httpx.Client(base_url=url, timeout=10) as client:
        for method, route, body in routes:
            assert client.request(method, route, json=body).status_code == 401, route
        assert client.get("/").status_code == 200  # the login page itself
        assert client.post("/login", data={"username": "alice", "password": "s3cret"}).status_code == 200
        assert client.post("/gradio_api/cancel", json=routes[0][2]).status_code != 401  # logged in: allowed
        assert client.get(f"/gradio_api/file={cfg.outputs_dir}/result.png").status_code == 200


@pytest.mark.parametrize("launched", [("alice", "s3cret")], indirect=True)
def test_wrong_passwords_from_one_address_never_lock_out_another(launched):
    url, _ = launched
    attacker, user = {"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "198.51.100.7"}
    with httpx.Client(base_url=url, timeout=10) as client:
        for k in range(12):
            client.post("/login", data={"username": "alice", "password": f"guess{k}"}, headers=attacker)
        refused = client.post("/login", data={"username": "alice", "password": "s3cret"}, headers=attacker)
        assert refused.status_code != 200  # the guessing address is backed off
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/login", data={"username": "alice", "password": "s3cret"}, headers=user).status_code == 200


def test_only_the_apps_own_files_are_served_and_uploads_are_capped(launched):
    url, cfg = launched
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get(f"/gradio_api/file={cfg.outputs_dir}/result.png").status_code == 200
        for outside in ["/etc/passwd", str(app.__file__), f"{cfg.outputs_dir}/../secret.txt"]:
            assert client.get(f"/gradio_api/file={outside}").status_code in (403, 404), outside
        big = client.post("/gradio_api/upload", files={"files": ("big.png", b"0" * (2 * 2**20), "image/png")})
        assert big.status_code == 413
        small = client.post("/gradio_api/upload", files={"files": ("small.png", b"0" * 1000, "image/png")})
        assert small.status_code == 200


def test_an_image_sent_inline_is_held_to_the_upload_cap_before_it_is_parsed(launched):
    """A data: URL skips the upload route: its JSON payload is refused by size before Gradio decodes it."""
    import base64

    url, cfg = launched
    inline = "data:image/png;base64," + base64.b64encode(b"0" * (3 * 2**20)).decode()  # 3 MB against 1 MB
    payload = {
        "data": [{"url": inline, "meta": {"_type": "gradio.FileData"}}, "Hi"],
        "fn_index": 0,
        "session_hash": "x",
    }
    with httpx.Client(base_url=url, timeout=30) as client:
        refused = client.post("/gradio_api/queue/join", json=payload)
        assert refused.status_code == 413 and "larger than this server accepts" in refused.text
        chunks = client.post("/gradio_api/queue/join", content=iter([b"{" + b" " * 2**20] * 4))  # no length given
        assert chunks.status_code >= 400
        fine = client.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
        assert fine.status_code != 413  # ordinary requests pass
        assert client.get("/config").status_code == 200  # and the server keeps serving


def test_safe_defaults_on_the_command_line():
    cfg = app.parse_args([])
    assert cfg.trust_remote_code is False and cfg.auth is None and cfg.share is False
    assert cfg.host == "127.0.0.1" and cfg.port == 7860
    assert app.parse_args(["--trust-remote-code"]).trust_remote_code is True
    assert app.parse_args(["--auth", "bob:pw"]).auth == ("bob", "pw")
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-colon"])


def test_share_without_auth_warns_loudly(caplog, monkeypatch):
    launched = {}
    monkeypatch.setattr(app, "build_ui", lambda cfg, slot, store: _FakeDemo(launched))
    monkeypatch.setattr(app, "start_loading", lambda cfg, slot: None)
    with caplog.at_level("WARNING"):
        app.main(["--share", "--port", "7999"])
    assert "anyone holding the public link can use this machine" in caplog.text
    assert "Could not create a public share link" in caplog.text
    assert launched["share"] is True


def test_weights_load_as_safetensors_only(tiny_model_dirs, tmp_path):
    import shutil

    from errors import ModelLoadError
    from model_holder import ModelHolder

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dirs["qwen2_vl"], pickled)
    holder = ModelHolder.load(pickled, device="cpu")
    import torch

    torch.save(holder.model.state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises((OSError, ModelLoadError, EnvironmentError)):
        ModelHolder.load(pickled, device="cpu")


class _FakeDemo:
    share_url = None
    local_url = "http://127.0.0.1:7999/"

    def __init__(self, record):
        self.record = record

    def queue(self, **kwargs):
        return self

    def launch(self, **kwargs):
        self.record.update(kwargs)

    def block_thread(self):
        pass
