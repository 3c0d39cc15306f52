"""What the usage sums say: frequencies, sharpness, MI, the paper's task similarity, task clusters.

Inputs are the summed tables of :class:`~modsquad_ds.eval.usage.LayerUsage` (one MoE layer).

- soft frequency P(e | t): ``soft_TE / tokens_T`` (rows sum to 1);
- hard frequency: ``hard_TE / (tokens_T * k)``, the share of task t's top-k choices that go to e
  (rows sum to 1; the paper's Fig. 5/6 colour);
- sharpness of a task's usage: ``1 - H(freq_t) / log E``: 0 when the task spreads evenly over all
  experts, 1 - log(k)/log(E) when it always uses the same k (the most a top-k router can reach);
- MI: I(T; E) of the soft table (paper eq. 5), what the MI loss maximises, with P(T) over tasks;
- task similarity S_ab: the mean over tokens of |S_a(x) & S_b(x)| / k, the fraction of experts two
  tasks use on the same input (1 on the diagonal; k/E expected for independent uniform routing);
- clusters: average-linkage hierarchical clustering of tasks with distance 1 - S.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from modsquad_ds.moe.losses import mutual_information

TASK_GROUPS = {
    # Taskonomy's grouping of the paper's tasks (Zamir et al. 2018, Fig. 7 / Sec. 4): 3D geometry,
    # 2D image structure, semantics.
    "3D": ["depth_euclidean", "depth_zbuffer", "normal", "principal_curvature", "reshading", "edge_occlusion",
           "keypoints3d", "segment_unsup25d"],
    "2D": ["edge_texture", "keypoints2d", "segment_unsup2d"],
    "semantic": ["class_object", "class_scene", "segment_semantic"],
}


def hard_frequency(layer) -> torch.Tensor:
    return layer.hard_TE / (layer.tokens_T.clamp_min(1) * layer.top_k)[:, None]


def soft_frequency(layer) -> torch.Tensor:
    return layer.soft_TE / layer.tokens_T.clamp_min(1)[:, None]


def sharpness(freq_TE: torch.Tensor) -> torch.Tensor:
    """Per task, 1 - normalised entropy of its usage row."""
    e = freq_TE.shape[1]
    if e < 2:
        return torch.zeros(freq_TE.shape[0], dtype=freq_TE.dtype)
    p = freq_TE / freq_TE.sum(1, keepdim=True).clamp_min(1e-300)
    ent = -(p * p.clamp_min(1e-300).log()).sum(1)
    return 1.0 - ent / math.log(e)


def layer_mi(layer) -> float:
    return float(mutual_information(layer.soft_TE))


def task_similarity(layer) -> torch.Tensor:
    return layer.overlap_TT / layer.overlap_tokens.clamp_min(1)


def summarize(layers: Mapping[str, object]) -> dict:
    """Per layer and overall: MI, mean sharpness (hard and soft), similarity matrix."""
    out, sims = {"layers": {}}, []
    for name in sorted(layers):
        layer = layers[name]
        sim = task_similarity(layer)
        sims.append(sim)
        out["layers"][name] = {
            "kind": layer.kind, "top_k": layer.top_k, "mi": layer_mi(layer),
            "sharpness_hard": float(sharpness(hard_frequency(layer)).mean()),
            "sharpness_soft": float(sharpness(soft_frequency(layer)).mean()),
            "hard_frequency": hard_frequency(layer).tolist(), "soft_frequency": soft_frequency(layer).tolist(),
            "similarity": sim.tolist()}
    if sims:
        per = out["layers"].values()
        out["mean_mi"] = float(np.mean([v["mi"] for v in per]))
        out["mean_sharpness_hard"] = float(np.mean([v["sharpness_hard"] for v in per]))
        out["mean_sharpness_soft"] = float(np.mean([v["sharpness_soft"] for v in per]))
        out["similarity"] = torch.stack(sims).mean(0).tolist()
    return out


def cluster_tasks(similarity_TT, names: Sequence[str], n_clusters: int) -> dict[str, int]:
    """Average-linkage clusters of tasks on distance 1 - similarity: task -> cluster id (0-based,
    numbered in order of first appearance in ``names``)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    sim = np.asarray(similarity_TT, dtype=np.float64)
    dist = np.clip(1.0 - (sim + sim.T) / 2.0, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    if len(names) < 2:
        return {n: 0 for n in names}
    labels = fcluster(linkage(squareform(dist, checks=False), method="average"), n_clusters, criterion="maxclust")
    order, out = {}, {}
    for name, lab in zip(names, labels):
        out[name] = order.setdefault(int(lab), len(order))
    return out


def group_separation(similarity_TT, names: Sequence[str], groups: Mapping[str, Sequence[str]] = TASK_GROUPS
                     ) -> dict[str, float]:
    """Mean similarity of task pairs within a group and across groups (off-diagonal pairs only),
    over the tasks of ``names`` that belong to a group. within > across: related tasks share experts."""
    sim = np.asarray(similarity_TT, dtype=np.float64)
    group_of = {t: g for g, ts in groups.items() for t in ts}
    within, across = [], []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if j <= i or a not in group_of or b not in group_of:
                continue
            (within if group_of[a] == group_of[b] else across).append(sim[i, j])
    res = {"within": float(np.mean(within)) if within else float("nan"),
           "across": float(np.mean(across)) if across else float("nan")}
    for g, ts in groups.items():
        idx = [names.index(t) for t in ts if t in names]
        pairs = [sim[i, j] for k, i in enumerate(idx) for j in idx[k + 1:]]
        if pairs:
            res[f"within_{g}"] = float(np.mean(pairs))
    return res
