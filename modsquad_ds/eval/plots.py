"""PNG heat maps in the manner of the paper's figures, written atomically.

- :func:`usage_maps`: per MoE layer, tasks x experts, colour the share of a task's top-k choices
  that go to each expert (Fig. 5 / 6: sharp, differing rows are what the MI loss aims at);
- :func:`similarity_map`: tasks x tasks, the fraction of experts two tasks share on the same input
  (Fig. A2-A4), one panel per layer or the mean over layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)


def _grid(n: int, cols: int = 4):
    cols = max(1, min(cols, n))
    return (n + cols - 1) // cols, cols


def usage_maps(path: Path, task_names: Sequence[str], usage: Mapping, key: str = "hard_frequency",
               title: str = "") -> None:
    """One heat map per MoE layer of ``usage["layers"][layer][key]`` (rows tasks, columns experts)."""
    layers = usage.get("layers", {})
    if not layers:
        return
    plt = _plt()
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, (0.24 * len(task_names) + 1.1) * rows),
                             squeeze=False)
    for ax, (name, layer) in zip(axes.flat, layers.items()):
        im = ax.imshow(layer[key], aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_title(f"{name} (MI {layer['mi']:.3f}, sharp {layer['sharpness_hard']:.2f})", fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_yticks(range(len(task_names)))
        ax.set_yticklabels(task_names, fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.04)
    _finish(fig, axes, len(layers), title, path)


def _finish(fig, axes, used: int, title: str, path: Path) -> None:
    """Blank the grid's unused panels, add the title, save."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def similarity_map(path: Path, task_names: Sequence[str], matrices: Mapping[str, Sequence], title: str = "",
                   vmin: float = 0.0, vmax: float = 1.0) -> None:
    """One panel per entry of ``matrices`` (label -> T x T similarity)."""
    if not matrices:
        return
    plt = _plt()
    n = len(task_names)
    rows, cols = _grid(len(matrices), cols=3)
    size = 0.32 * n + 1.6
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax, (label, sim) in zip(axes.flat, matrices.items()):
        im = ax.imshow(sim, cmap="magma", vmin=vmin, vmax=vmax)
        ax.set_title(label, fontsize=8)
        ax.set_xticks(range(n))
        ax.set_xticklabels(task_names, fontsize=6, rotation=90)
        ax.set_yticks(range(n))
        ax.set_yticklabels(task_names, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.04)
    _finish(fig, axes, len(matrices), title, path)


def bar_chart(path: Path, labels: Sequence[str], means: Sequence[float], spreads: Sequence[float],
              ylabel: str, title: str = "") -> None:
    """Means with +-spread error bars (e.g. Delta_t per method over seeds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(0.9 * len(labels) + 2.0, 3.2))
    ax.bar(range(len(labels)), means, yerr=spreads, capsize=3, color="#4c72b0")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
