"""The benchmarks are commands users run (README, docs/benchmarks.md, benchmarks/gpu_check.sh), not
tests, so nothing else would notice one that no longer starts. Every script answers ``--help``; a
bad count or preset ends in one line, exit 2; one real run of the whole-step benchmark writes its
ratios."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))

# One interpreter for all of them: each imports torch (and most DeepSpeed), seconds apiece.
_HELP_ALL = """
import contextlib, io, runpy, sys
sys.path.insert(0, sys.argv[1])
for path in sys.argv[2:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        print(f"{path}: no exit")
    except SystemExit as e:
        print(f"{path}: exit {e.code}: {out.getvalue().splitlines()[0] if out.getvalue() else ''}")
"""


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_benchmark_answers_help():
    assert len(BENCHMARKS) >= 10
    res = _run("-c", _HELP_ALL, str(ROOT / "benchmarks"), *map(str, BENCHMARKS))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert len(lines) == len(BENCHMARKS), res.stdout
    for path, line in zip(BENCHMARKS, lines):
        assert line.startswith(f"{path}: exit 0: usage: {path.name}"), line


def test_bad_count_and_unknown_preset_are_one_line():
    res = _run("benchmarks/moe_layer.py", "--reps", "0")
    assert res.returncode == 2 and "argument --reps: must be >= 1, got 0" in res.stderr, res.stderr
    res = _run("benchmarks/train_step.py", "--presets", "nonesuch", "--no-loop")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: preset: unknown preset 'nonesuch'"), res.stderr


def test_train_step_writes_ratios_against_its_dense_peer(tmp_path):
    out = tmp_path / "step.json"
    res = _run("benchmarks/train_step.py", "--presets", "tiny", "--batch", "1", "--repeats", "1", "--no-loop",
               "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    tiny = json.loads(out.read_text())["presets"]["tiny"]
    assert set(tiny) == {"dense", "modsquad", "modsquad+ckpt"}
    assert tiny["dense"]["dense_ms/ms"] == 1.0 and tiny["dense"]["memory_vs_dense"] == 1.0
    for row in tiny.values():
        assert row["dense_ms/ms"] == tiny["dense"]["ms"] / row["ms"]
        assert row["memory_vs_dense"] == row["memory_bytes"] / tiny["dense"]["memory_bytes"]
    # grad checkpointing keeps only block inputs: less saved for backward than without it
    assert tiny["modsquad+ckpt"]["memory_bytes"] < tiny["modsquad"]["memory_bytes"]


def test_gpu_check_records_every_part_and_fails_when_none_ran(tmp_path):
    """benchmarks/gpu_check.sh, the one command a lent GPU runs, with no budget: every part is
    recorded as skipped in the results file, and the exit status says the check did not pass."""
    import os

    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_BUDGET_S="1", PYTHON=sys.executable)
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    results = (tmp_path / "gpu_check.txt").read_text()
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"python {sys.version.split()[0]}, torch " in results, results
    skipped = [line for line in results.splitlines() if line.endswith(": SKIPPED (budget spent)")]
    # on a CPU: the two test parts, moe_layer, train_step, trainer_overhead and its data
    assert len(skipped) == 6, results
    assert results.splitlines()[-1].startswith("gpu_check done in "), results
    assert "parts failed or skipped: " in results.splitlines()[-1]
    named = set(re.findall(r"(?:tests/gpu|benchmarks)/\w+\.(?:py|sh)", (ROOT / "benchmarks/gpu_check.sh").read_text()))
    assert len(named) >= 8, named
    assert [name for name in sorted(named) if not (ROOT / name).is_file()] == []  # every file it names exists
