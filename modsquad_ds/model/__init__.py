"""Pure model math: the Mod-Squad ViT, its heads, losses and objective. No distributed code here.

Importing this package registers the models with timm.
"""

from modsquad_ds.model import registry as _registry  # noqa: F401  (timm registration)
from modsquad_ds.model.factory import build_dense_peer, build_model
from modsquad_ds.model.output import ModelOutput
from modsquad_ds.model.vit import ModSquadViT

__all__ = ["ModSquadViT", "ModelOutput", "build_dense_peer", "build_model"]
