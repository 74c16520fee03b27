"""Encoder-only forward+backward time, sparse vs masked backend, interleaved in one run.

    python benchmarks/encoder_speed.py            # atto, 224 px, batch 32, mask 0.6, 1 thread

For whole training steps (decoder, optimizer, memory, FLOPs) use benchmarks/pretrain_speed.py.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fcmae  # noqa: E402
import models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per backend, after one warm-up")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = models.SparseConvNeXtV2(args.model)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    cells = (args.input_size // encoder.total_stride) ** 2
    visible = fcmae.random_visible_cells(args.batch_size, cells, args.mask_ratio,
                                         generator=torch.Generator().manual_seed(0))
    seconds = {"sparse": [], "masked": []}
    for repeat in range(args.repeats + 1):
        for backend in seconds:  # interleaved, so machine noise hits both alike
            encoder.backend = backend
            start = time.perf_counter()
            encoder(images, visible).square().mean().backward()
            if repeat:
                seconds[backend].append(time.perf_counter() - start)
    print(f"{args.model}, {args.input_size} px, batch {args.batch_size}, mask {args.mask_ratio}, "
          f"{args.threads} thread(s); encoder forward+backward, median of {args.repeats}:")
    for backend, values in seconds.items():
        print(f"  {backend}: {statistics.median(values):.3f} s")
    print(f"  masked / sparse = {statistics.median(seconds['masked']) / statistics.median(seconds['sparse']):.2f}x")


if __name__ == "__main__":
    main()
