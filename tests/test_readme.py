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
    api_index = next(i for i, (lang, _) in enumerate(blocks) if lang == "python")
    setup = blocks[api_index - 1][1].split("#")[0].strip()  # the command before it
    assert setup.startswith("python -m testing.tiny_models")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, *setup.split()[1:]], cwd=tmp_path, check=True, env=env, capture_output=True)
    (tmp_path / "outputs").mkdir()
    script = tmp_path / "example.py"
    script.write_text(blocks[api_index][1])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "outputs" / "token0.png").stat().st_size > 1000
