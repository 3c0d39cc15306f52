"""Which of the release's classification outputs the tasks keep.

The release stores 1000 ImageNet logits per image (class_object) and 365 Places values
(class_scene); the paper trains on 100 object and 63 scene classes without listing them. We keep a
fixed, documented subset by default and let a run override it (``data.class_object_keep`` /
``data.class_scene_keep``) with the exact indices, e.g. the classes most frequent in a split.

Defaults (both evenly spaced, so they cover the whole label space and are easy to reproduce):
- class_object: ImageNet indices 0, 10, 20, ..., 990 (100 classes).
- class_scene: Places365 indices floor(i * 365 / 63) for i = 0..62 (63 classes).

The kept values are probabilities renormalised to sum to 1 over the kept classes (see
:func:`modsquad_ds.data.decode.class_probs`).
"""

from __future__ import annotations

NUM_OBJECT_LOGITS = 1000
NUM_SCENE_VALUES = 365

DEFAULT_OBJECT_KEEP: tuple[int, ...] = tuple(range(0, NUM_OBJECT_LOGITS, 10))
DEFAULT_SCENE_KEEP: tuple[int, ...] = tuple(i * NUM_SCENE_VALUES // 63 for i in range(63))

RAW_LENGTH = {"class_object": NUM_OBJECT_LOGITS, "class_scene": NUM_SCENE_VALUES}


def default_keep(task: str) -> tuple[int, ...]:
    return {"class_object": DEFAULT_OBJECT_KEEP, "class_scene": DEFAULT_SCENE_KEEP}[task]


def check_keep(task: str, keep: list[int] | tuple[int, ...], channels: int) -> None:
    """Raise ValueError unless ``keep`` lists ``channels`` distinct valid indices."""
    n = RAW_LENGTH[task]
    if len(keep) != channels:
        raise ValueError(f"lists {len(keep)} indices, the {task} task has {channels} classes")
    if len(set(keep)) != len(keep):
        raise ValueError("lists an index twice")
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ValueError(f"indices {bad[:5]} are outside [0, {n})")
