r"""Delta_t, the paper's summary of multi-task quality (Sec. 4.1, Table 2), and a Table 2 style
comparison of several evaluated runs.

Per task, the relative change of its main metric against the single-task (STL) baseline, signed so
that better is positive, in percent:

    delta_t = (-1)^{l_t} (M_t - M_STL,t) / M_STL,t * 100,   l_t = 1 if lower is better

and Delta_t is the mean over tasks. Depth counts by RMSE only (one value per depth task). A task
whose baseline metric is 0 or undefined (e.g. an accuracy of 0 on a tiny split) has no relative
change; it is reported as nan and left out of the mean.

    python -m modsquad_ds.eval.delta_t --baseline runs/stl/eval/test_step_00000100.json \
        runs/mtl/eval/test_step_00000100.json runs/modsquad/eval/test_step_00000100.json

prints a markdown table (one row per run: Delta_t, then each task's delta). STL is one run per task:
repeat ``--baseline`` once per task's evaluation file and their tasks are merged.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

from modsquad_ds.data.tasks import get_task
from modsquad_ds.eval.metrics import main_metric


def task_deltas(metrics: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float]],
                tasks: Sequence[str] | None = None) -> dict[str, float]:
    """Per-task delta in percent, better positive, over ``tasks`` (default: tasks both have)."""
    tasks = list(tasks) if tasks is not None else [t for t in metrics if t in baseline]
    out = {}
    for task in tasks:
        key = main_metric(task)
        m, b = float(metrics[task][key]), float(baseline[task][key])
        if b == 0 or math.isnan(b) or math.isnan(m):
            out[task] = float("nan")
            continue
        sign = -1.0 if get_task(task).lower_is_better else 1.0
        out[task] = sign * (m - b) / abs(b) * 100.0
    return out


def delta_t(metrics, baseline, tasks=None) -> float:
    """Mean over tasks of :func:`task_deltas` (the paper's Delta_t, in percent); nan deltas left out."""
    deltas = [d for d in task_deltas(metrics, baseline, tasks).values() if not math.isnan(d)]
    return sum(deltas) / len(deltas) if deltas else float("nan")


def load_metrics(path: str | Path) -> dict:
    """The ``tasks`` mapping of an evaluation JSON (``modsquad_ds.evaluate`` writes them)."""
    data = json.loads(Path(path).read_text())
    return data["tasks"] if "tasks" in data else data


def comparison_table(runs: Mapping[str, Mapping], baseline: Mapping, tasks: Sequence[str] | None = None) -> str:
    """Markdown: one row per run, Delta_t then per-task deltas (percent, better positive)."""
    tasks = list(tasks) if tasks is not None else [t for t in baseline if all(t in m for m in runs.values())]
    head = "| run | Delta_t (%) | " + " | ".join(tasks) + " |"
    rule = "|---|---:|" + "---:|" * len(tasks)
    rows = [head, rule]
    for name, metrics in runs.items():
        d = task_deltas(metrics, baseline, tasks)
        mean = delta_t(metrics, baseline, tasks)
        rows.append(f"| {name} | {mean:+.2f} | " + " | ".join(f"{d[t]:+.2f}" for t in tasks) + " |")
    return "\n".join(rows)


def _row_names(paths: Sequence[str]) -> list[str]:
    """Each file's run folder (eval files live in {run}/eval/), with the file's name where one run
    gives several files (two checkpoints or splits of one run must not collapse into one row)."""
    runs = [Path(p).resolve().parent.parent.name for p in paths]
    return [f"{run} {Path(p).stem}" if runs.count(run) > 1 else run for run, p in zip(runs, paths)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modsquad_ds.eval.delta_t", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action="append", required=True, metavar="JSON",
                        help="evaluation JSON of a single-task baseline; repeat for one file per task")
    parser.add_argument("runs", nargs="+", help="evaluation JSONs to compare")
    args = parser.parse_args(argv)
    try:
        baseline = {}
        for path in args.baseline:
            baseline.update(load_metrics(path))
        runs = {name: load_metrics(p) for name, p in zip(_row_names(args.runs), args.runs)}
    except (OSError, ValueError, KeyError) as err:
        print(f"error: cannot read evaluation file: {err}", file=sys.stderr)
        return 2
    print(comparison_table(runs, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
