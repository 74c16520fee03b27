"""Labels of class-folder datasets: a label is the index of its class folder's name in sorted
order, so two splits (train and val, a checkpoint and its data) must have the same class folders,
or a class missing from one would silently shift every later label."""
from __future__ import annotations

from typing import Sequence

from .config import ConfigError

MAX_LISTED_CLASSES = 20


def check_same_classes(classes_a: Sequence[str], classes_b: Sequence[str], name_a: str = "train",
                       name_b: str = "val", where: str = "") -> None:
    """ConfigError listing the class folders found on only one side (``where`` adds context)."""
    if list(classes_a) == list(classes_b):
        return
    only_a = sorted(set(classes_a) - set(classes_b))
    only_b = sorted(set(classes_b) - set(classes_a))
    raise ConfigError(
        f"the classes of {name_a} and {name_b} differ{where}: only in {name_a}: {_listing(only_a)}; only in "
        f"{name_b}: {_listing(only_b)}. Labels are indices into the sorted class folder names, so both need the "
        "same class folders (an empty folder is enough for a class without images)."
    )


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED_CLASSES]) or "none"
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > MAX_LISTED_CLASSES else ''}]"
