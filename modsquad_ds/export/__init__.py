"""Export: read DeepSpeed checkpoints of any layout, prune per task, write standalone models.

Importing this package registers ``modsquad_task_vit`` with timm.
"""

from modsquad_ds.export import task_model as _task_model  # noqa: F401  (timm registration)
