"""Classification evaluation: top-1, top-5 and cross-entropy, exact under distributed evaluation.

With ``--dist_eval`` every rank evaluates a shard (``DistributedSampler(shuffle=False)``) and
the counts are summed across ranks. That sampler pads the index list by repeating its first
indices so that every rank gets the same number of samples; the padding lands at the end of
the list, so on rank ``r`` only the first ``len(range(r, N, world_size))`` samples are real
and the rest are skipped. The accuracy is then that of each image counted exactly once. Files that
could not be read (target ``engine.data.UNREADABLE_TARGET``) are left out of every count.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from engine.data import UNREADABLE_TARGET, to_device
from engine.signals import stop_signals_blocked
from engine.stepper import amp_autocast


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    amp: str = "none",
) -> dict[str, float]:
    """Accuracy of ``model`` over the images of ``loader``'s dataset, each counted once.

    Returns ``{"acc1": %, "acc5": %, "loss": mean cross-entropy, "count": images}``. With a
    ``DistributedSampler`` over several ranks the counts are summed over the process group (without
    one, the result is this rank's shard, padding excluded). Top-5 is top-k with
    ``k = min(5, classes)``. ``amp`` ("none", "bf16", "fp16") runs the forward pass under autocast.
    """
    device = torch.device(device)
    real_count = _real_samples_on_this_rank(loader)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    seen = 0
    was_training = model.training
    model.eval()
    with stop_signals_blocked():  # workers started now ignore the stop signals from their first instruction
        batches = iter(loader)
    for images, targets in batches:
        keep = min(len(targets), max(real_count - seen, 0)) if real_count is not None else len(targets)
        seen += len(targets)
        if keep == 0:
            continue
        images, targets = images[:keep], targets[:keep]  # views: still in the loader's (pinned) memory
        readable = targets != UNREADABLE_TARGET  # an unreadable file is left out, not guessed
        if not readable.all():
            if not readable.any():
                continue
            images, targets = images[readable], targets[readable]
        images, targets = to_device(images, device), to_device(targets, device)
        with amp_autocast(device.type, amp):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        totals += torch.stack([
            hits[:, 0].sum(),
            hits.any(dim=1).sum(),
            F.cross_entropy(logits, targets, reduction="sum"),
            torch.tensor(len(targets), device=device),
        ]).double()
    model.train(was_training)
    if real_count is not None and loader.sampler.num_replicas > 1 and dist.is_initialized():
        dist.all_reduce(totals)  # each rank evaluated its own shard
    correct1, correct5, loss_sum, count = totals.tolist()
    if count == 0:
        raise ValueError("evaluation loader yielded no images")
    return {"acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count,
            "loss": loss_sum / count, "count": int(count)}


def _real_samples_on_this_rank(loader: DataLoader) -> int | None:
    """How many of this rank's samples are real (not padding); None when nothing is padded."""
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler):
        return None
    if sampler.shuffle:
        raise ValueError("distributed evaluation needs DistributedSampler(shuffle=False): with "
                         "shuffling the padding duplicates cannot be told apart")
    if sampler.drop_last:
        raise ValueError("distributed evaluation needs DistributedSampler(drop_last=False), "
                         "otherwise some images are never evaluated")
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
