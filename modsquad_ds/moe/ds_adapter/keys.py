"""State-dict keys of the two layouts, ``MoEMlp`` and expert-parallel, and DeepSpeed's expert file names."""

from __future__ import annotations

import re
from typing import Optional

_DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"
_DS_ROUTER = "deepspeed_moe.gate.router"

_EP_KEY = re.compile(rf"^(.*)\.{re.escape(_DS_EXPERTS)}\.(\d+)\.(.*)$")


def reference_key(key: str, global_expert_id: Optional[int] = None) -> str:
    """Map a state-dict key of an expert-parallel model to the ``MoEMlp`` model's key.

    Expert keys of DeepSpeed's expert checkpoint files already carry the global expert id; keys from a
    live module's ``state_dict`` carry the local id: pass ``global_expert_id`` for those.
    """
    m = _EP_KEY.match(key)
    if m:
        expert = global_expert_id if global_expert_id is not None else int(m.group(2))
        return f"{m.group(1)}.experts.experts.{expert}.{m.group(3)}"
    return key.replace(f".{_DS_ROUTER}.", ".router.")


def expert_parallel_key(key: str) -> str:
    """Map a ``MoEMlp`` model key to the expert-parallel model's key (expert ids stay global, as in
    DeepSpeed's ``layer_{L}_expert_{E}`` files). Keys of other modules pass through unchanged, so
    apply it only to keys of MoE MLP layers."""
    key = re.sub(r"\.experts\.experts\.(\d+)\.", rf".{_DS_EXPERTS}.\1.", key)
    return key.replace(".router.", f".{_DS_ROUTER}.")


def expert_checkpoint_name(layer_id: int, global_expert_id: int, mp_rank: int = 0) -> str:
    """File name of one expert's weights in a DeepSpeed checkpoint tag folder."""
    return f"layer_{layer_id}_expert_{global_expert_id}_mp_rank_{mp_rank:02d}_model_states.pt"
