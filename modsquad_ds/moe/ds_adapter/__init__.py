"""Expert-parallel MoE MLP on DeepSpeed's native MoE: the one package that touches ``deepspeed.moe``.

:class:`ExpertParallelMoEMlp` *is* a ``deepspeed.moe.layer.MoE`` (the engine finds MoE layers by
``isinstance``), so DeepSpeed's machinery applies unchanged: its expert-parallel and
expert-data-parallel process groups, its gradient reduction (expert grads over the expert-data-parallel
group, divided by the data-parallel world size), its optimizer parameter groups
(:func:`moe_param_groups`) and its checkpoint files, one per MoE layer L and *global* expert id E:
``layer_{L}_expert_{E}_mp_rank_00_model_states.pt`` (L counts MoE MLP layers in module order, not
blocks). It keeps :class:`~modsquad_ds.moe.layer.MoEMlp`'s calling convention,
``(x_TBND, task_ids_T) -> (y_TBND, RoutingStats)``, so the model code does not change:
:func:`convert_to_expert_parallel` swaps the layers of a built model from outside. Only the MoE MLP
layers are expert-parallel: a mixture-of-attention expert's query attends over every token of its
image, so attention experts cannot be split by token dispatch and stay replicated.

One file per job:

- ``layer.py``: the layer; at ep_size 1 it runs ``MoEMlp``'s dropless dispatch over DeepSpeed's
  expert modules, at ep_size > 1 DeepSpeed's ``MOELayer`` with our gate and batched experts;
- ``gate.py``: :class:`TaskGate`, our per-task router behind DeepSpeed's gate contract, dropless;
- ``convert.py``: swapping ``MoEMlp`` layers for expert-parallel ones and back;
- ``keys.py``: state-dict keys and expert checkpoint file names of both layouts;
- ``optim.py``: DeepSpeed's MoE parameter groups, and the gradient clipping ZeRO 0 gets wrong.

Constraints: every rank of an expert-parallel group must call every MoE MLP layer the same number of
times (forward all-reduce and all-to-alls); evaluate on all ranks, or convert back first with
:func:`convert_to_single_process`. Convert before building the optimizer and the engine.
"""

from modsquad_ds.moe.ds_adapter.convert import convert_to_expert_parallel, convert_to_single_process, expert_parallel_layers
from modsquad_ds.moe.ds_adapter.gate import TaskGate
from modsquad_ds.moe.ds_adapter.keys import expert_checkpoint_name, expert_parallel_key, reference_key
from modsquad_ds.moe.ds_adapter.layer import BatchedExperts, ExpertParallelMoEMlp
from modsquad_ds.moe.ds_adapter.optim import clip_grad_norm_, is_expert_param, moe_param_groups

__all__ = ["TaskGate", "BatchedExperts", "ExpertParallelMoEMlp", "convert_to_expert_parallel", "convert_to_single_process",
           "expert_parallel_layers", "moe_param_groups", "reference_key", "expert_parallel_key",
           "expert_checkpoint_name", "clip_grad_norm_", "is_expert_param"]
