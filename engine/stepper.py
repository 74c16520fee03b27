"""Everything between a micro-batch's loss and the optimizer update it contributes to.

    stepper = GradientStepper(model, optimizer, amp="bf16", update_freq=4, clip_grad=1.0, ema=ema)
    with stepper.micro_batch(iteration):        # DDP syncs gradients on a group's last micro-batch only
        with stepper.autocast():
            loss = loss_fn(model, batch)
        stepper.backward(loss)
    if stepper.ends_update(iteration):
        grad_norm, skipped = stepper.step()     # 0-d device tensors

* ``update_freq`` (micro-batches per optimizer update) is owned here: ``updates_per_epoch``,
  ``starts_update``, ``ends_update``; a trailing partial accumulation group is dropped.
* Every precision goes through a ``GradScaler``: fp16 scales the loss dynamically; bf16 and fp32
  keep the scale at 1 (exact) and use only its inf/NaN check. An update whose gradients are not
  finite is **skipped**: weights and optimizer state stay as they were. The check stays on the
  device when the optimizer takes it itself (fused AdamW, the default on CUDA); other optimizers
  read it on the host (a sync, free on the CPU).
* ``step()`` unscales, takes the gradient norm (before clipping) and clips, steps (or skips),
  updates the EMA (after a skipped update it moves toward the unchanged weights) and clears the
  gradients. Nothing reads the device.
* On the device: skipped updates so far, and the current run of skipped updates in a row
  (``skipped_in_row``), which ``engine.progress`` reads at log points to stop a run whose
  gradients stay non-finite.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional

import models  # noqa: F401  (torchvision guard before timm)
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from .compat import total_norm
from .distributed import find_ddp

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_INITIAL_SCALE = 2.0 ** 16


def amp_autocast(device_type: str, amp: str) -> ContextManager:
    """Autocast to bf16/fp16 on ``device_type`` ("cuda", "cpu", "mps"); ``amp == "none"``: no-op."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AMP_DTYPES[amp])


def build_model_ema(model: nn.Module, decay: float) -> ModelEmaV3:
    """EMA copy of ``model`` (unwrapped: not DDP / torch.compile), on the same device and dtype:
    after each update ``ema = decay * ema + (1 - decay) * w`` for every parameter and buffer
    (constant decay, no warmup, as in the official recipe)."""
    return ModelEmaV3(model, decay=decay)


class GradientStepper:
    """Backward, accumulation and optimizer updates of one model (see the module docstring).

    ``model`` is what the loss runs (possibly DDP / torch.compile wrapped); ``ema`` follows
    ``ema_source`` (the unwrapped model) after every update.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: str = "none",
                 update_freq: int = 1, clip_grad: Optional[float] = None, ema: Optional[ModelEmaV3] = None,
                 ema_source: Optional[nn.Module] = None):
        if amp not in ("none", *AMP_DTYPES):
            raise ValueError(f"amp must be none, bf16 or fp16, got {amp!r}")
        self.model, self.optimizer, self.ema, self.ema_source = model, optimizer, ema, ema_source or model
        self.amp, self.update_freq, self.clip_grad = amp, update_freq, clip_grad
        device = next(model.parameters()).device
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(self.device_type, init_scale=FP16_INITIAL_SCALE if amp == "fp16" else 1.0)
        self._skipped_updates = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_in_row = torch.zeros((), dtype=torch.int64, device=device)

    # ---------------------------------------------------------------- accumulation

    def updates_per_epoch(self, num_batches: int) -> int:
        return num_batches // self.update_freq

    def starts_update(self, iteration: int) -> bool:
        return iteration % self.update_freq == 0

    def ends_update(self, iteration: int) -> bool:
        """Whether micro-batch ``iteration`` ends an accumulation group (and so steps)."""
        return (iteration + 1) % self.update_freq == 0

    def micro_batch(self, iteration: int) -> ContextManager:
        """DDP ``no_sync()`` for micro-batches that only accumulate; wrap forward and backward."""
        ddp = find_ddp(self.model)
        if ddp is None or self.ends_update(iteration):
            return contextlib.nullcontext()
        return ddp.no_sync()

    def autocast(self) -> ContextManager:
        return amp_autocast(self.device_type, self.amp)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss / update_freq`` (scaled under fp16)."""
        self.scaler.scale(loss / self.update_freq).backward()

    # ---------------------------------------------------------------- the update

    def parameters(self) -> list[torch.Tensor]:
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def gradient_norm(self) -> torch.Tensor:
        """Total L2 norm of the (unscaled) gradients before clipping, as a 0-d device tensor;
        clips them to ``clip_grad`` when set. Not finite when any gradient is not."""
        if self.clip_grad is not None:
            return torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip_grad)
        return total_norm([param.grad for param in self.parameters() if param.grad is not None])

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimizer update of the accumulated gradients, skipped when they are not finite.
        Returns ``(gradient norm before clipping, skipped)``: 0-d device tensors, ``skipped`` 1
        for a skipped update."""
        self.scaler.unscale_(self.optimizer)  # at scale 1 (bf16/fp32) only the inf/NaN check
        grad_norm = self.gradient_norm().detach()
        self.scaler.step(self.optimizer)  # skipped when a gradient is inf/NaN
        if self.amp == "fp16":
            self.scaler.update()  # backs off after an overflow, grows after a while without one
        else:
            self.scaler.update(1.0)
        skipped = (~torch.isfinite(grad_norm)).long()
        self._skipped_updates += skipped
        self.skipped_in_row.mul_(skipped).add_(skipped)  # +1 when skipped, back to 0 otherwise
        if self.ema is not None:
            self.ema.update(self.ema_source)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    @property
    def skipped_updates(self) -> int:
        """Updates skipped so far (reads the device: call it at log points only)."""
        return int(self._skipped_updates)

    def lr(self) -> float:
        """The largest lr over param groups (with layer-wise decay: the head's)."""
        return max(group["lr"] for group in self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.amp == "fp16" else {},
                "skipped_updates": self.skipped_updates, "skipped_in_row": int(self.skipped_in_row)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.amp == "fp16" and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._skipped_updates.fill_(int(state.get("skipped_updates", 0)))
        self.skipped_in_row.fill_(int(state.get("skipped_in_row", 0)))
