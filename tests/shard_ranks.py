"""What each rank runs in the streamed-shards test (helper module, no tests here): it imports only
torch and ``engine.data``, so the processes the test spawns start quickly."""
import torch
import torch.distributed as dist

from engine.data import ImageFiles, build_loader, pretrain_transform
from engine.shards import ShardIndexCache

WORLD_SIZE = 2


def streamed_labels_on_rank(rank, port, pattern, results):
    """One epoch of this rank's training loader (batch 2, 2 workers) over streamed shards: its labels."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        index = ShardIndexCache().load_or_build(pattern)
        loader = build_loader(ImageFiles(index, pretrain_transform(32)), batch_size=2, num_workers=2, seed=3,
                              rank=rank, world_size=WORLD_SIZE)
        loader.sampler.set_epoch(1)
        results[rank] = [batch[1].tolist() for batch in loader]
    finally:
        dist.destroy_process_group()
