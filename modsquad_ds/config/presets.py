"""Named presets: plain mappings layered under the user's YAML and ``--set`` overrides.

- tiny: seconds on a laptop CPU; the embedded demo.
- small: ViT-S/16 with 15 attention experts top-6 and 16 MLP experts top-4 (paper, PASCAL-Context).
- base: ViT-B/16 with 24 attention experts top-12 and 16 MLP experts top-4 (paper, Taskonomy).
  Attention experts have 128-wide heads as in the reference code; with them the model has the
  paper's Table 2 size (about 200M parameters). dim / top_k = 64 would give about 179M.
"""

PRESETS: dict[str, dict] = {
    "tiny": {
        "model": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4},
        "moe": {"attn": {"num_experts": 8, "top_k": 4}, "mlp": {"num_experts": 8, "top_k": 2}},
    },
    "small": {
        "model": {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
        "moe": {"attn": {"num_experts": 15, "top_k": 6}, "mlp": {"num_experts": 16, "top_k": 4}},
    },
    "base": {
        "model": {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
        "moe": {"attn": {"num_experts": 24, "top_k": 12, "expert_dim": 128}, "mlp": {"num_experts": 16, "top_k": 4}},
    },
}
