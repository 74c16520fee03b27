"""Distributed evaluation over a real 2-process gloo group: exact counts despite sampler padding."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from conftest import free_port
from finetune.evaluate import evaluate

COUNT, WORLD_SIZE = 7, 2  # DistributedSampler pads 7 -> 8: rank 1 gets image 0 a second time


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, index):
        return self.logits[index]


def logits_and_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(COUNT, 5, generator=generator)
    labels = logits.argmax(1)
    labels[0] = (labels[0] + 1) % 5  # image 0, the padding duplicate, is misclassified: counting it twice shows
    return logits, labels


def evaluate_on_rank(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        logits, labels = logits_and_labels()
        dataset = TensorDataset(torch.arange(COUNT), labels)
        sampler = DistributedSampler(dataset, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)
        results[rank] = evaluate(FixedLogits(logits), DataLoader(dataset, batch_size=2, sampler=sampler))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_evaluation_counts_each_image_once():
    logits, labels = logits_and_labels()
    single = evaluate(FixedLogits(logits), DataLoader(TensorDataset(torch.arange(COUNT), labels), batch_size=3))
    assert single["acc1"] == pytest.approx(100 * 6 / 7)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(evaluate_on_rank, args=(free_port(), results), nprocs=WORLD_SIZE, join=True)
        results = dict(results)
    for rank in range(WORLD_SIZE):
        assert results[rank]["count"] == COUNT, rank
        assert results[rank]["acc1"] == pytest.approx(single["acc1"]), rank
        assert results[rank]["loss"] == pytest.approx(single["loss"]), rank
