"""FLOPs of a training step and model FLOP utilisation (MFU).

* ``flop_counter()``: ``torch.utils.flop_counter.FlopCounterMode`` with the grouped-convolution
  backward counted right (torch's own formula counts a grouped conv's weight gradient as if it
  were ungrouped, ``groups`` times too many: 320x for atto's last depthwise convs).
* ``peak_tflops(device_name, precision)``: dense peak TFLOPS of common NVIDIA GPUs, keyed by
  ``torch.cuda.get_device_name()``; None for an unknown device (then no MFU is reported).
  ``precision`` is ``"bf16"`` (also fp16), ``"tf32"`` or ``"fp32"``.
* ``model_flops_utilization(flops_per_image, images_per_s, peak)``: the fraction of the peak
  that the counted FLOPs at the measured throughput (one device) use.
* ``count_step_flops(model, loss_fn, batch, step, autocast)``: FLOPs per image of a training
  micro-batch (forward + backward), counted on fake tensors: shapes only, no computation and no
  memory on the device, the model and its gradients untouched.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from .compat import get_tf32

# (substring of torch.cuda.get_device_name(), dense peak TFLOPS {bf16, tf32, fp32}); the first
# match wins, so the more specific names come first. Vendor data sheets, without sparsity.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"bf16": 125.0, "fp32": 15.7}),  # no bf16 or tf32 units: the fp16 tensor-core peak
    ("RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
)


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: each gradient asked for (input, weight) costs as
    many multiply-adds as the forward conv, grouped or not."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOPS of ``device_name`` at ``precision``; None if the device is not in the table."""
    for key, peaks in PEAK_TFLOPS:
        if key in device_name:
            return peaks.get(precision, peaks["fp32"])
    return None


def matmul_precision(amp: str) -> str:
    """The tensor-core precision matmuls run at under ``--amp``: bf16/fp16 autocast -> "bf16",
    fp32 -> "tf32" when TF32 matmuls are allowed now (``compat.get_tf32``, whichever torch switch
    allowed them), else "fp32"."""
    if amp != "none":
        return "bf16"
    return "tf32" if get_tf32().matmul else "fp32"


def model_flops_utilization(flops_per_image: float, images_per_s: float, peak_tflops_value: float) -> float:
    """``flops_per_image * images_per_s / peak``: throughput of one device against its peak."""
    return flops_per_image * images_per_s / (peak_tflops_value * 1e12)


def batch_size_of(batch: Any) -> int:
    """Images in ``batch``: a tensor, or a tuple/list/dict whose first item is one."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    return batch_size_of(batch[0])


class _WithTensors(nn.Module):
    """``module`` run with other parameter and buffer tensors (``torch.func.functional_call``)."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.module, self.tensors = module, tensors

    def forward(self, *args, **kwargs):
        return functional_call(self.module, self.tensors, args, kwargs)


def count_step_flops(model: nn.Module, loss_fn: Callable, batch: Any, step: Any,
                     autocast: ContextManager) -> Optional[float]:
    """FLOPs per image of ``loss_fn(model, batch, step)`` forward + backward (the training code
    itself, under ``autocast``), run on fake copies of the model's tensors and of ``batch``;
    None when the model cannot run on fake tensors (e.g. the MinkowskiEngine backend)."""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
            def fake(tensor):
                if not isinstance(tensor, torch.Tensor):
                    return tensor
                return fake_mode.from_tensor(tensor.detach()).requires_grad_(tensor.requires_grad)

            tensors = {name: fake(tensor) for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
            trained = [tensor for tensor in tensors.values() if tensor.requires_grad]
            with flop_counter() as counter:
                with autocast:
                    loss, _ = loss_fn(_WithTensors(model, tensors), tree_map(fake, batch), step)
                torch.autograd.grad(loss, trained, allow_unused=True)
    except Exception:  # noqa: BLE001  (an op without a fake-tensor kernel: no count, no MFU)
        return None
    return counter.get_total_flops() / batch_size_of(batch)
