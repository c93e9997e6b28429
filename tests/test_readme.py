"""The README's first lines and its API example work as written."""

import os
import re
import subprocess
import sys

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_starts_with_install_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert "pip install -r requirements.txt" in first_block and "python app.py" in first_block
    assert "python -m pytest -q" in first_block
    assert first_block.lstrip().startswith("python3 -m venv .venv")  # plain Debian has no `python`
    ci = (REPO / ".ci" / "run").read_text()
    assert "-m pytest -q" in ci and "python3 -m venv" in ci and "\npython " not in ci


def test_readme_api_example_runs(tmp_path):
    blocks = re.findall(r"```(bash|python)\n(.*?)```", README, re.S)
    api_index = next(i for i, (lang, code) in enumerate(blocks) if lang == "python" and "model_holder" in code)
    setup = blocks[api_index - 1][1].split("#")[0].strip()  # the command before it
    assert setup.startswith("python -m testing.tiny_models")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, *setup.split()[1:]], cwd=tmp_path, check=True, env=env, capture_output=True)
    script = tmp_path / "example.py"  # run in a fresh folder, outside the repository
    script.write_text(blocks[api_index][1])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "outputs" / "token0.png").stat().st_size > 1000


def test_readme_gradio_client_example_runs_against_the_default_app(tmp_path):
    """The README's gradio_client block, as written, against `python app.py` with no options (the demo
    model on a CPU), run from the repository folder as the README says."""
    import pytest

    from config import DEMO_MODEL_DIR
    from conftest import free_port

    if not (DEMO_MODEL_DIR / "config.json").exists():
        pytest.skip("the demo model is not present")
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    (code,) = [block for block in blocks if "gradio_client" in block]
    port = free_port()
    with open(tmp_path / "app.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--port", str(port), "--device", "cpu"],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        script = tmp_path / "client_example.py"
        wait = (
            "import time\nfrom gradio_client import Client\n"
            "for _ in range(180):\n"
            "    try:\n"
            f"        Client({url!r}, verbose=False).predict({str(DEMO_MODEL_DIR)!r}, api_name='/load_model'); break\n"
            "    except Exception:\n"
            "        time.sleep(0.5)\n"
        )
        script.write_text(wait + code.replace("http://127.0.0.1:7860/", url))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:] + (tmp_path / "app.log").read_text()[-2000:]
        assert "Token 0" in result.stdout and "the whole image" in result.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_api_needs_only_what_the_readme_says_is_required(tmp_path):
    from gradio_client import Client

    import app
    from config import AppConfig
    from conftest import free_port
    from pipeline import ModelSlot, RunStore

    assert "only\n`generate`'s `image` and `prompt` are required" in (REPO / "README.md").read_text()
    demo = app.build_ui(AppConfig(outputs_dir=tmp_path), ModelSlot(), RunStore(64))
    demo.queue()
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    try:
        api = Client(f"http://127.0.0.1:{port}/", verbose=False).view_api(return_format="dict", print_info=False)
        required = {
            name: [p["parameter_name"] for p in info["parameters"] if not p.get("parameter_has_default")]
            for name, info in api["named_endpoints"].items()
        }
        assert {name: params for name, params in required.items() if params} == {"/generate": ["image", "prompt"]}
    finally:
        demo.close()
