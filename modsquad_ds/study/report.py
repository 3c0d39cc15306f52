"""The study's markdown report: tables and figures that answer the paper's claims side by side.

Inputs: ``results[method][seed]`` = the evaluation JSON of that run (for STL, the per-task runs'
``tasks`` merged into one). Everything below is computed from those files; the prose states what
the numbers show, whichever way they come out.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from modsquad_ds.eval import plots
from modsquad_ds.eval.delta_t import delta_t, task_deltas
from modsquad_ds.eval.report import SHORT, table1
from modsquad_ds.eval.similarity import TASK_GROUPS, cluster_tasks, group_separation


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values: Sequence[float], fmt: str = "{:+.2f}") -> str:
    m, s = mean_sd(values)
    return f"{fmt.format(m)} ± {fmt.replace('+', '').format(s)}" if not math.isnan(m) else "n/a"


def group_order(tasks: Sequence[str]) -> list[str]:
    """Tasks ordered by group (3D, 2D, semantic, others) so related tasks sit together in maps."""
    ordered = [t for g in TASK_GROUPS.values() for t in g if t in tasks]
    return ordered + [t for t in tasks if t not in ordered]


def _reorder(matrix, tasks: Sequence[str], order: Sequence[str]):
    idx = [list(tasks).index(t) for t in order]
    return [[matrix[i][j] for j in idx] for i in idx]


def _mean_matrix(mats):
    n = len(mats[0])
    return [[statistics.fmean(m[i][j] for m in mats) for j in range(n)] for i in range(n)]


def _cluster_groups(clusters: Mapping[str, int]) -> dict[int, set]:
    """Cluster id -> the set of task groups (3D, 2D, semantic, other) its members belong to."""
    group_of = {t: g for g, ts in TASK_GROUPS.items() for t in ts}
    out: dict[int, set] = {}
    for task, c in clusters.items():
        out.setdefault(c, set()).add(group_of.get(task, "other"))
    return out


def build(results: Mapping[str, Mapping[int, dict]], labels: Mapping[str, str], tasks: Sequence[str],
          out: Path, settings: Mapping[str, str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({s for runs in results.values() for s in runs})
    methods = [m for m in labels if m in results]
    lines = ["# Mod-Squad in miniature: the paper's claims on the mini-Taskonomy", ""]
    lines += ["Produced by `python -m modsquad_ds.study` (" + ", ".join(f"{k} {v}" for k, v in settings.items())
              + f"); seeds {', '.join(map(str, seeds))}. Values are mean ± standard deviation over seeds. "
              "These are tiny models trained for minutes on 160 procedurally rendered views: they test "
              "whether the machinery reproduces the paper's *direction* of effects, not its numbers.", ""]

    # Table 1: metrics per method, mean over seeds.
    mean_metrics = {}
    for m in methods:
        per_task = {}
        for t in tasks:
            key_vals = {}
            for s in seeds:
                if s in results[m] and t in results[m][s]["tasks"]:
                    for k, v in results[m][s]["tasks"][t].items():
                        key_vals.setdefault(k, []).append(v)
            per_task[t] = {k: mean_sd(v)[0] for k, v in key_vals.items()}
        mean_metrics[labels[m]] = per_task
    lines += ["## Metrics per task (the paper's Table 1), mean over seeds", "",
              table1(mean_metrics, tasks), ""]

    # Delta_t against STL of the same seed.
    findings = []
    if "stl" in results:
        dt = {m: [delta_t(results[m][s]["tasks"], results["stl"][s]["tasks"], tasks)
                  for s in seeds if s in results[m] and s in results["stl"]] for m in methods if m != "stl"}
        lines += ["## Delta_t against single-task models (the paper's Table 2)", "",
                  "Per task, the relative change of its main metric against the STL run of the same seed, "
                  "better positive, in percent; Delta_t is the mean over tasks (depth by RMSE only).", "",
                  "| method | Delta_t (%) | per seed |", "|---|---:|---|"]
        for m, vals in dt.items():
            lines.append(f"| {labels[m]} | {pm(vals)} | {', '.join(f'{v:+.2f}' for v in vals)} |")
        lines.append("")
        per_task_rows = []
        for m in dt:
            d = [task_deltas(results[m][s]["tasks"], results["stl"][s]["tasks"], tasks) for s in seeds
                 if s in results[m] and s in results["stl"]]
            per_task_rows.append(f"| {labels[m]} | " + " | ".join(
                f"{statistics.fmean(x[t] for x in d):+.1f}" for t in tasks) + " |")
        lines += ["Per-task deltas (%, mean over seeds):", "",
                  "| method | " + " | ".join(SHORT.get(t, t) for t in tasks) + " |",
                  "|---|" + "---:|" * len(tasks), *per_task_rows, ""]
        names = [labels[m] for m in dt]
        plots.bar_chart(out / "delta_t.png", names, [mean_sd(v)[0] for v in dt.values()],
                        [mean_sd(v)[1] for v in dt.values()], "Delta_t vs STL (%)",
                        "Delta_t per method (mean ± sd over seeds)")
        lines += ["![Delta_t per method](delta_t.png)", ""]
        means = [mean_sd(v)[0] for v in dt.values()]
        if means and all(m < 0 for m in means):
            findings.append("Every multi-task model is worse than the single-task models here (all Delta_t < 0), "
                            "unlike the paper's Table 2 (one plausible reason: at this budget a single-task "
                            "model's whole capacity and loss serve one task).")
        if "modsquad" in dt:
            ms_m, ms_s = mean_sd(dt["modsquad"])
            for variant, note in (("modsquad_authors", " (its wider dense attention heads also add parameters and "
                                                        "FLOPs, so it is not an equal-cost comparison)"),
                                  ("modsquad_topk_mi", "")):
                if variant in dt:
                    v_m, v_s = mean_sd(dt[variant])
                    findings.append(f"Fidelity switch: {labels[variant]} reaches Delta_t {v_m:+.2f} ± {v_s:.2f} "
                                    "against "
                                    f"Mod-Squad's {ms_m:+.2f} ± {ms_s:.2f}{note}.")
            for other in ("mtl", "normal_moe", "modified_moe", "m3vit"):
                if other in dt:
                    o_m, o_s = mean_sd(dt[other])
                    gap = ms_m - o_m
                    verdict = ("higher" if gap > 0 else "lower")
                    if len(dt["modsquad"]) < 2 or len(dt[other]) < 2:
                        spread = "one seed: no spread to judge the gap by."
                    elif abs(gap) > ms_s + o_s:
                        spread = "the gap exceeds the summed spreads."
                    else:
                        spread = "the gap is within the seeds' spread, so this run does not separate them."
                    findings.append(f"Mod-Squad's Delta_t ({ms_m:+.2f} ± {ms_s:.2f}) is {verdict} than "
                                    f"{labels[other]}'s ({o_m:+.2f} ± {o_s:.2f}) by {abs(gap):.2f} points; " + spread)

    # Routing: MI and sharpness.
    moe = [m for m in methods if any(results[m][s].get("usage") for s in results[m])]
    if moe:
        lines += ["## Expert usage: mutual information and sharpness (paper Fig. 5 / 6)", "",
                  "MI: I(task; expert) of the soft routing table of each MoE layer, averaged over layers "
                  "(nats; at most log(number of tasks)). Sharpness: 1 - normalised entropy of a task's "
                  "hard usage row, averaged over tasks and layers (0: spread evenly over all experts).", "",
                  "| method | aux loss | MI (nats) | sharpness |", "|---|---|---:|---:|"]
        aux = {"normal_moe": "none", "modified_moe": "balance", "m3vit": "balance", "modsquad": "MI",
               "moe_mlp_only": "MI", "moe_attn_only": "MI", "modsquad_authors": "MI",
               "modsquad_topk_mi": "MI (top-k gates)"}
        routing = {}
        for m in moe:
            mi = [results[m][s]["usage"]["mean_mi"] for s in seeds if s in results[m]]
            sh = [results[m][s]["usage"]["mean_sharpness_hard"] for s in seeds if s in results[m]]
            routing[m] = (mi, sh)
            lines.append(f"| {labels[m]} | {aux.get(m, '?')} | {pm(mi, '{:.4f}')} | {pm(sh, '{:.3f}')} |")
        lines.append("")
        if "modsquad" in routing and "normal_moe" in routing:
            (a, b), (c, d) = routing["modsquad"], routing["normal_moe"]
            findings.append(f"With the MI loss the usage maps have MI {mean_sd(a)[0]:.4f} ± {mean_sd(a)[1]:.4f} "
                            f"nats and sharpness {mean_sd(b)[0]:.3f}; without any auxiliary loss (Normal MoE) "
                            f"MI {mean_sd(c)[0]:.4f} ± {mean_sd(c)[1]:.4f} and sharpness {mean_sd(d)[0]:.3f}: "
                            + ("the MI loss made routing more task-specific, as the paper claims."
                               if mean_sd(a)[0] > mean_sd(c)[0] else
                               "the MI loss did not raise MI here, unlike the paper's claim."))
        first = seeds[0]
        for m in ("modsquad", "normal_moe", "modified_moe"):
            if m in results and first in results[m] and results[m][first].get("usage"):
                plots.usage_maps(out / f"usage_{m}.png", tasks, results[m][first]["usage"],
                                 title=f"{labels[m]}, seed {first}: share of each task's top-k choices per expert")
                lines.append(f"![usage {labels[m]}](usage_{m}.png)")
        lines.append("")

        # Task similarity and grouping.
        order = group_order(tasks)
        lines += ["## Do related tasks share experts? (paper Fig. A2-A4)", "",
                  "Similarity of two tasks: the mean fraction of experts they both pick for the same token, "
                  "averaged over MoE layers and seeds. Groups: 3D = " + ", ".join(TASK_GROUPS["3D"]) +
                  "; 2D = " + ", ".join(TASK_GROUPS["2D"]) + "; semantic = class_object, class_scene.", "",
                  "| method | within groups | across groups | within 3D | within 2D | clusters (3, average linkage) |",
                  "|---|---:|---:|---:|---:|---|"]
        mats = {}
        for m in moe:
            sims = [results[m][s]["usage"]["similarity"] for s in seeds if s in results[m]]
            mean_sim = _mean_matrix(sims)
            seps = [group_separation(x, list(tasks)) for x in sims]
            clusters = cluster_tasks(mean_sim, list(tasks), 3)
            groups = {}
            for t, c in clusters.items():
                groups.setdefault(c, []).append(SHORT.get(t, t))
            desc = "; ".join("{" + ", ".join(v) + "}" for v in groups.values())
            lines.append(f"| {labels[m]} | {pm([x['within'] for x in seps], '{:.3f}')} | "
                         f"{pm([x['across'] for x in seps], '{:.3f}')} | "
                         f"{pm([x.get('within_3D', float('nan')) for x in seps], '{:.3f}')} | "
                         f"{pm([x.get('within_2D', float('nan')) for x in seps], '{:.3f}')} | {desc} |")
            mats[labels[m]] = _reorder(mean_sim, tasks, order)
            if m in ("modsquad", "normal_moe"):
                w, a = mean_sd([x["within"] for x in seps]), mean_sd([x["across"] for x in seps])
                w3 = mean_sd([x.get("within_3D", float("nan")) for x in seps])
                w2 = mean_sd([x.get("within_2D", float("nan")) for x in seps])
                mixed = sum(1 for members in _cluster_groups(clusters).values() if len(members) > 1)
                findings.append(
                    f"Under {labels[m]}, task pairs within a group share {w[0]:.3f} ± {w[1]:.3f} of their experts on "
                    f"the same input, pairs across groups {a[0]:.3f} ± {a[1]:.3f} "
                    + ("(the same)" if w[0] == a[0]
                       else "(less: groups do not share more experts inside than across)" if w[0] < a[0]
                       else "(more; one seed: no spread to judge the gap by)" if len(seps) < 2
                       else "(more, by more than the summed spreads)" if w[0] > a[0] + w[1] + a[1]
                       else "(more, but within the spread)")
                    + f"; within 3D {w3[0]:.3f}, within 2D {w2[0]:.3f}. Its three task clusters are {desc}: "
                    + (f"{mixed} of them mix tasks of different groups, so the clusters do not recover the "
                       "3D / 2D split."
                       if mixed else "each holds tasks of one group only."))
        lines.append("")
        plots.similarity_map(out / "similarity.png", [SHORT.get(t, t) for t in order], mats,
                             title="task similarity (fraction of shared experts), tasks ordered 3D, 2D, semantic")
        lines += ["![task similarity](similarity.png)", ""]

    lines[4:4] = ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    path = out / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
