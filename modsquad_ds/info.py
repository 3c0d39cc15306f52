"""Model sizes and costs for every preset, then one training step of the tiny preset.

``python -m modsquad_ds.info`` (or ``modsquad-info``) prints, per preset, the parameter count and
the forward FLOPs per image and task of Mod-Squad against the dense multi-task ViT of the same width
(the Params / FLOPs columns of the paper's Table 2), then runs one forward and backward pass.

``--fidelity`` adds, per preset, the size and cost of Mod-Squad under the fidelity switches (the
authors' choices where the paper leaves them open) and names the setting closest to the paper's
201.3M parameters / 19.7 GFLOPs. On the base preset (measured 2026-11-29): as configured 193.9M /
18.19; ``moe.wide_dense_attention=true`` (the authors' code) 208.0M / 21.34; with also
``moe.attn.expert_dim=64`` 193.3M / 19.47, the closest; ``model.class_head=mean_patch`` adds 3k
parameters. No switch gives both numbers exactly.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from modsquad_ds.config import ConfigError, PRESETS, load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_dense_peer, build_model
from modsquad_ds.model.flops import count_params, forward_macs
from modsquad_ds.model.objective import MultiTaskObjective

PAPER_TABLE2 = "paper Table 2, ViT-B: Mod-Squad 201.3M / 19.7 GFLOPs, MTL 90.0M / 18.5 GFLOPs"
PAPER_MODSQUAD = (201.3, 19.7)

FIDELITY_VARIANTS = [
    ("as configured", []),
    ("moe.wide_dense_attention=true", ["moe.wide_dense_attention=true"]),
    ("moe.wide_dense_attention=true moe.attn.expert_dim=64",
     ["moe.wide_dense_attention=true", "moe.attn.expert_dim=64"]),
    ("model.class_head=mean_patch", ["model.class_head=mean_patch"]),
]


def size_rows(presets, overrides) -> list[tuple]:
    rows = []
    for preset in presets:
        cfg = load_config(overrides=overrides, preset=preset)
        images = torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size)
        one_task = [cfg.tasks.names[0]]
        for label, model in (("Mod-Squad", build_model(cfg)), ("dense ViT", build_dense_peer(cfg))):
            rows.append((preset, label, count_params(model) / 1e6, forward_macs(model, images, one_task) / 1e9))
            del model
    return rows


def print_table(rows) -> None:
    print(f"{'preset':<8}{'model':<12}{'Params (M)':>12}{'GFLOPs/img/task':>18}")
    for preset, label, params, gflops in rows:
        print(f"{preset:<8}{label:<12}{params:>12.1f}{gflops:>18.4g}")
    print(f"(FLOPs = multiply-adds of one image through one task's path, as fvcore counts; {PAPER_TABLE2})")


def fidelity_rows(preset: str, overrides) -> list[tuple]:
    """(setting, params M, GFLOPs/img/task) of Mod-Squad on ``preset`` under each fidelity variant."""
    rows = []
    for label, extra in FIDELITY_VARIANTS:
        cfg = load_config(overrides=[*overrides, *extra], preset=preset)
        images = torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size)
        model = build_model(cfg)
        rows.append((label, count_params(model) / 1e6, forward_macs(model, images, [cfg.tasks.names[0]]) / 1e9))
        del model
    return rows


def closest_to_paper(rows) -> tuple:
    """The row with the smallest summed relative gap to the paper's 201.3M / 19.7 GFLOPs."""
    p, g = PAPER_MODSQUAD
    return min(rows, key=lambda r: abs(r[1] / p - 1) + abs(r[2] / g - 1))


def print_fidelity(preset: str, rows) -> None:
    print(f"\nfidelity switches, {preset} preset, Mod-Squad:")
    print(f"{'setting':<56}{'Params (M)':>12}{'GFLOPs/img/task':>18}")
    for label, params, gflops in rows:
        print(f"{label:<56}{params:>12.1f}{gflops:>18.4g}")
    if preset != "base":
        return  # the paper's numbers are for ViT-B
    label, params, gflops = closest_to_paper(rows)
    print(f"closest to the paper's {PAPER_MODSQUAD[0]}M / {PAPER_MODSQUAD[1]} GFLOPs: {label} "
          f"({params:.1f}M / {gflops:.4g})")


def train_step(overrides) -> dict:
    cfg = load_config(overrides=overrides, preset="tiny")
    torch.manual_seed(cfg.seed)
    model, objective = build_model(cfg), MultiTaskObjective(cfg)
    batch = synthetic_batch(cfg.tasks.names, 4, cfg.model.img_size, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    loss, stats = objective(model(batch["image"]), batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return {"loss": float(loss.detach()), "seconds": time.perf_counter() - start,
            "params_with_grad": len(grads), "params": len(list(model.parameters())),
            "mi": sum(float(v) for k, v in stats.items() if k.startswith("mi/"))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="modsquad-info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                        help="presets to measure (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every preset, e.g. moe.placement=every")
    parser.add_argument("--fidelity", action="store_true",
                        help="also measure Mod-Squad under the fidelity switches (slow for base: minutes)")
    args = parser.parse_args(argv)
    try:
        print_table(size_rows(args.presets, args.overrides))
        if args.fidelity:
            for preset in args.presets:
                print_fidelity(preset, fidelity_rows(preset, args.overrides))
        step = train_step(args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"tiny preset, one forward/backward on a synthetic batch of 4 images x all tasks: "
          f"loss {step['loss']:.4f}, sum of layer MI {step['mi']:.4f} nats, "
          f"{step['params_with_grad']}/{step['params']} parameter tensors got gradients, "
          f"{step['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
