"""What an export saved: parameters and FLOPs per task against the full model and the dense ViT
(the paper's Fig. 3 / Table A1 in the run's setting), and a picture of the experts each task kept."""

from __future__ import annotations

from pathlib import Path

import torch

from modsquad_ds.model.flops import count_params, forward_macs


def task_costs(task_model, full_model, dense_model, task: str, images: torch.Tensor) -> dict:
    """Parameters and multiply-adds per image of one task: pruned model, full Mod-Squad model
    running that task, and the dense multi-task ViT of the same width and depth running it."""
    b = images.shape[0]
    row = {"task": task,
           "params": count_params(task_model),
           "full_params": count_params(full_model),
           "dense_params": count_params(dense_model),
           "macs": forward_macs(task_model, images) // b,
           "full_macs": forward_macs(full_model, images, [task]) // b,
           "dense_macs": forward_macs(dense_model, images, [task]) // b}
    row["params_vs_full"] = row["params"] / row["full_params"]
    row["macs_vs_full"] = row["macs"] / row["full_macs"]
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = ["| task | params (M) | vs full | vs dense ViT | GFLOPs/img | full model GFLOPs | dense ViT GFLOPs | experts kept |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['params'] / 1e6:.3f} | {r['params_vs_full']:.1%} | "
                     f"{r['params'] / r['dense_params']:.1%} | {r['macs'] / 1e9:.4f} | {r['full_macs'] / 1e9:.4f} | "
                     f"{r['dense_macs'] / 1e9:.4f} | {r['kept']}/{r['experts']} |")
    if rows:
        r = rows[0]
        lines.append(f"\nfull model: {r['full_params'] / 1e6:.3f} M parameters (all tasks); dense multi-task ViT: "
                     f"{r['dense_params'] / 1e6:.3f} M. FLOPs: one multiply-add = one FLOP (fvcore / the paper).")
    return "\n".join(lines) + "\n"


def plot_kept(path: Path, plans: dict[str, dict[str, dict]]) -> None:
    """Heat map, one row per task and one column per MoE layer: the share of the layer's experts the
    task kept, with the count written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(plans)
    layers = list(next(iter(plans.values())))
    share = [[len(plans[t][l]["kept"]) / plans[t][l]["num_experts"] for l in layers] for t in tasks]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(layers), 1.0 + 0.3 * len(tasks)))
    im = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, t in enumerate(tasks):
        for j, l in enumerate(layers):
            ax.text(j, i, str(len(plans[t][l]["kept"])), ha="center", va="center", fontsize=6,
                    color="white" if share[i][j] < 0.6 else "black")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks, fontsize=6)
    ax.set_title("experts kept per task and MoE layer", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03, label="share kept")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
