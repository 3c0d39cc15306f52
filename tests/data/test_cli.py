"""Each tool runs as ``python -m data_tools.X`` and as ``python data_tools/X.py``; --help explains."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ["make_shards", "verify_shards", "mini_taskonomy"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_both_ways(tool):
    for cmd in ([sys.executable, "-m", f"data_tools.{tool}", "--help"],
                [sys.executable, str(REPO / "data_tools" / f"{tool}.py"), "--help"]):
        out = subprocess.run(cmd, cwd=REPO if "-m" in cmd else "/", capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "usage:" in out.stdout and ("Taskonomy" in out.stdout or "shards" in out.stdout)


def test_bad_input_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "data_tools.make_shards", "--root", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no such folder" in out.stderr
    out = subprocess.run([sys.executable, "-m", "data_tools.verify_shards", "--index", str(tmp_path / "x.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().startswith("error: shard index not found")
