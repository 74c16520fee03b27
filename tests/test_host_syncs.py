"""Between two log points a training micro-batch makes the host wait for the device zero times.

Counted with ``HostSyncCounter`` (ops that read a device value or have data-dependent shapes)
over real training epochs of both CLIs' loss functions and steppers: pretraining (FCMAE, default
sparse backend, gradient accumulation 2) and fine-tuning (drop path, Mixup/CutMix, EMA, layer
decay). Each micro-batch's count runs from the start of its loss to the start of the next
one's; the log points (which read, all-reduce and check the loss once) are the only places
allowed to sync.

The optimizer is AdamW with ``fused=True``: engine.optim's default on CPU is the single-tensor
AdamW, which reads its step counters with ``.item()``; those live on the CPU even when training
on CUDA (no device sync there), and CUDA runs use the fused kernel.
"""
import torch

import fcmae
import pretrain
from engine.loop import train_one_epoch
from engine.progress import is_log_point
from engine.stepper import GradientStepper, build_model_ema
from engine.schedule import build_lr_scheduler
from finetune.mixup import build_mixup, build_train_criterion
from finetune.model import build_finetune_model
from finetune_helpers import load_finetune_script
from host_syncs import HostSyncCounter
from models.layer_decay import param_groups_layer_decay

ITERATIONS = 8
PRINT_FREQ = 4


def syncs_per_micro_batch(model, loss_fn, stepper, batches, update_freq):
    """{iteration: syncing ops from the start of its loss to the start of the next} over one epoch."""
    starts = {}

    def counted_loss(model, batch, step):
        starts[step.iteration] = counter.count
        return loss_fn(model, batch, step)

    scheduler = build_lr_scheduler(stepper.optimizer, epochs=1, warmup_epochs=0,
                                   updates_per_epoch=len(batches) // update_freq)
    with HostSyncCounter() as counter:
        train_one_epoch(model, batches, counted_loss, stepper, scheduler, epoch=0, epochs=1, print_freq=PRINT_FREQ,
                        seed=0)
    starts[len(batches)] = counter.count
    return {iteration: starts[iteration + 1] - starts[iteration] for iteration in range(len(batches))}, counter


def assert_no_sync_between_log_points(per_micro_batch, counter, update_freq):
    between = {iteration: count for iteration, count in per_micro_batch.items()
               if not is_log_point(iteration, ITERATIONS, PRINT_FREQ, update_freq)}
    assert len(between) == ITERATIONS - ITERATIONS // PRINT_FREQ
    assert sum(between.values()) == 0, f"syncs per micro-batch {per_micro_batch}; ops over the epoch: {counter.report()}"


def test_pretraining_micro_batches_do_not_sync_between_log_points():
    torch.manual_seed(0)
    model = fcmae.build_fcmae("convnextv2_atto")  # the default sparse backend
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
    stepper = GradientStepper(model, optimizer, update_freq=2, clip_grad=1.0)
    batches = [(torch.randn(2, 3, 64, 64), torch.zeros(2, dtype=torch.int64)) for _ in range(ITERATIONS)]
    loss_fn = pretrain.make_loss_fn(torch.device("cpu"))
    per_micro_batch, counter = syncs_per_micro_batch(model, loss_fn, stepper, batches, update_freq=2)
    assert_no_sync_between_log_points(per_micro_batch, counter, update_freq=2)


def test_finetuning_micro_batches_with_ema_and_mixup_do_not_sync_between_log_points():
    torch.manual_seed(0)
    model = build_finetune_model("convnextv2_atto", 4, None, drop_path=0.1)
    groups = param_groups_layer_decay(model, (2, 2, 6, 2), 0.05, 0.9, "single")
    optimizer = torch.optim.AdamW(groups, lr=1e-3, fused=True)
    ema = build_model_ema(model, 0.9)
    stepper = GradientStepper(model, optimizer, update_freq=1, ema=ema)
    mixup = build_mixup(4, 0.8, 1.0, None, 1.0, 0.5, "batch", 0.1)
    loss_fn = load_finetune_script().make_loss_fn(mixup, build_train_criterion(mixup, 0.1), torch.device("cpu"))
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))) for _ in range(ITERATIONS)]
    per_micro_batch, counter = syncs_per_micro_batch(model, loss_fn, stepper, batches, update_freq=1)
    assert_no_sync_between_log_points(per_micro_batch, counter, update_freq=1)
