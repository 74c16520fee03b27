"""What each rank runs in the sharded k-NN test (helper module, no tests here): it imports only
torch and ``engine.knn``, so the processes the test spawns start quickly."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine import knn as engine_knn

WORLD_SIZE = 2


def sharded_knn_on_rank(rank, port, bank, bank_labels, queries, query_labels, bank_split, query_split, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        engine_knn.SIMILARITY_BLOCK_ELEMENTS = 2 * bank_split[0]  # 2 queries per chunk: several rounds per rank
        bank, bank_labels, queries, query_labels = (
            tensor.split(split)[rank] for tensor, split in ((F.normalize(bank, dim=1), bank_split),
                                                            (bank_labels, bank_split),
                                                            (F.normalize(queries, dim=1), query_split),
                                                            (query_labels, query_split)))
        results[rank] = engine_knn.sharded_knn_top1(bank, bank_labels, queries, query_labels, num_classes=3, k=5)
    finally:
        dist.destroy_process_group()
