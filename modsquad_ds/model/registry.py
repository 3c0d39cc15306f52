"""timm registrations: ``timm.create_model("modsquad_vit_small_patch16_224", tasks=[...])``.

Keyword arguments: ``tasks`` (task names; default the paper's 13), ``overrides`` (a list of
``section.key=value`` strings as on the command line), ``pretrained_file`` (a local dense ViT
checkpoint; timm's own ``pretrained=True`` would download, which we never do at run time).
"""

from __future__ import annotations

from typing import Optional, Sequence

from timm.models import register_model

from modsquad_ds.config.loader import load_config
from modsquad_ds.model.factory import build_model
from modsquad_ds.model.vit import ModSquadViT


def _create(preset: str, pretrained: bool, tasks: Optional[Sequence[str]],
            overrides: Sequence[str], pretrained_file: Optional[str], **unused) -> ModSquadViT:
    if pretrained:
        raise ValueError("pretrained=True would download weights; pass pretrained_file=<local path>")
    extra = list(overrides)
    if tasks is not None:
        extra.append("tasks.names=[" + ",".join(tasks) + "]")
    if pretrained_file:
        extra.append(f"model.pretrained={pretrained_file}")
    return build_model(load_config(overrides=extra, preset=preset))


@register_model
def modsquad_vit_tiny_patch8_32(pretrained=False, tasks=None, overrides=(), pretrained_file=None, **kw):
    return _create("tiny", pretrained, tasks, overrides, pretrained_file, **kw)


@register_model
def modsquad_vit_small_patch16_224(pretrained=False, tasks=None, overrides=(), pretrained_file=None, **kw):
    return _create("small", pretrained, tasks, overrides, pretrained_file, **kw)


@register_model
def modsquad_vit_base_patch16_224(pretrained=False, tasks=None, overrides=(), pretrained_file=None, **kw):
    return _create("base", pretrained, tasks, overrides, pretrained_file, **kw)
