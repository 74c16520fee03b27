"""Counting the operations that make the host wait for the device (no tests here).

On a GPU these block the CPU until every queued kernel has run: reading a value
(``.item()``, ``bool(tensor)``, ``int(tensor)``, ``tolist``), a result whose shape depends on
the data (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``), or comparing whole
tensors (``equal``). They dispatch to the ops below on every device, so counting them on CPU
shows what a CUDA run would pay.

    with HostSyncCounter() as counter:
        train_step()
    assert counter.count == 0, counter.report()
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

SYNCING_OPS = frozenset({
    _aten._local_scalar_dense.default,  # .item(), bool(), int(), float(), tolist()
    _aten.is_nonzero.default,
    _aten.nonzero.default,
    _aten.nonzero_static.default,
    _aten.masked_select.default,
    _aten.equal.default,
    _aten.allclose.default,
    _aten._unique2.default,
    _aten.unique_consecutive.default,
    _aten.unique_dim.default,
    _aten.repeat_interleave.Tensor,  # without output_size its length is read from the data
})


# indexing with a boolean mask computes ``nonzero`` inside the kernel
_INDEXING_OPS = frozenset({_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default})


def _has_boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
               for index in indices or ())


class HostSyncCounter(TorchDispatchMode):
    """Counts dispatched ops that synchronise host and device; ``ops`` names them."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS or (func in _INDEXING_OPS and _has_boolean_index(args)):
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def report(self) -> str:
        return ", ".join(f"{name} x{count}" for name, count in self.ops.most_common()) or "none"
