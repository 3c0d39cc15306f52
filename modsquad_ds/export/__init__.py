"""Export: read DeepSpeed checkpoints of any layout, prune per task, write standalone models.

Importing this package registers ``modsquad_task_vit`` with timm; ``TaskViT`` is the exported model.
"""

from modsquad_ds.export.task_model import TaskViT  # also registers modsquad_task_vit with timm

__all__ = ["TaskViT"]
