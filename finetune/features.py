"""Frozen ConvNeXt V2 features: pooled embeddings and the four stage maps.

Python API::

    extractor = FeatureExtractor("convnextv2_atto", "output/pretrain/encoder.safetensors", input_size=224)
    pooled = extractor.pooled(images)            # (N, dims[-1]): the head's pre-logits
    stages = extractor.stages(images)            # [(N, dims[i], H / (s * 2**i), W / (s * 2**i)) for i in 0..3]

``images`` is a list of PIL images and/or image paths (str or Path), each put through the
evaluation transform (resize to ``input_size / crop_pct``, center crop, ImageNet normalisation;
see ``engine.eval_transform``), or tensors already normalised that way: an (N, C, H, W) batch or
a list of (C, H, W) images of one size. A single PIL image or path is a batch of one. The
stem stride ``s`` (4, or 2) and the channel count ``C`` are the checkpoint's unless given;
PIL images and paths are read as RGB, so a model of another channel count takes tensors.

``pooled`` is ``forward_head(forward_features(x), pre_logits=True)``: global average pool then
the head LayerNorm (weight 1, bias 0 for a pretrained encoder, which never trains it: each
embedding is then standardised across channels); ``stages`` are the outputs of the four
stages, what detection/segmentation necks consume (``models.create_backbone`` gives the same
maps as a trainable timm ``features_only`` model).

CLI: features of every image of a folder of class folders (``<data_path>/<class>/<image>``)::

    python -m finetune.features --model convnextv2_atto --checkpoint encoder.safetensors \\
        --data_path /data/imagenette2-224/val --output val_features.safetensors [--stages]

The file (``.safetensors`` or ``.npz``) holds, row ``i`` for image ``i``:

* ``pooled``: (N, C) float32; ``labels``: (N,) int64, the index of the image's class folder;
  with ``--stages`` also ``stage0``..``stage3``, (N, dims[i], S / (s * 2**i), S / (s * 2**i)).
* ``class_names``: the class folder names, sorted, so ``class_names[labels[i]]`` is image i's class;
  ``paths``: the image files, in row order (unreadable files are left out, rows and paths alike).
* ``model_name``, ``checkpoint``, ``input_size``, ``crop_pct``: how the features were made.

In a safetensors file the last two items are string metadata (``class_names`` and ``paths`` as
JSON lists); in an npz file they are string arrays. ``load_features`` reads either back into
one dict (tensors, ``class_names`` and ``paths`` as lists, the rest as strings).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import models
from models.convnextv2 import DEFAULT_IN_CHANS, DEFAULT_STEM_STRIDE
from engine.checkpoint import atomic_write, save_safetensors
from engine.config import TrainingArgumentParser
from engine.data import ImageFolderSkippingUnreadable
from engine.image_decode import load_rgb_image
from engine.compat import require_supported_versions
from engine.distributed import choose_device
from engine.embeddings import extract_pooled, extract_pooled_and_stages, extract_stages
from engine.eval_transform import build_eval_transform
from engine.logging import format_duration, setup_logging
from engine.progress_bar import progress_bar
from engine.stepper import amp_autocast

_logger = logging.getLogger(__name__)

NUM_STAGES = 4
OUTPUT_SUFFIXES = (".safetensors", ".npz")


class FeatureExtractor:
    """A frozen dense ConvNeXt V2 in eval mode, from any checkpoint ``models.load_pretrained``
    reads (ours, our encoder export, official FCMAE / fine-tuned / MinkowskiEngine files), or
    randomly initialised when ``checkpoint`` is None. ``input_size`` and ``crop_pct`` define the
    evaluation transform applied to PIL images and paths (module docstring). ``stem_stride`` and
    ``in_chans``: None takes the checkpoint's (4 and 3 without one); another value adapts its stem."""

    def __init__(self, model_name: str, checkpoint: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu", amp: str = "none", input_size: int = 224,
                 crop_pct: float | None = None, stem_stride: int | None = None, in_chans: int | None = None):
        if checkpoint is None:
            model = models.create_dense_model(model_name, stem_stride or DEFAULT_STEM_STRIDE,
                                              in_chans or DEFAULT_IN_CHANS)
        else:
            model = models.load_pretrained(model_name, checkpoint, stem_stride=stem_stride, in_chans=in_chans)
        self.model = model.eval().requires_grad_(False).to(device)
        self.in_chans = models.stem_geometry(model.stem[0].weight)[1]
        self.device, self.amp = torch.device(device), amp
        self.transform = build_eval_transform(input_size, crop_pct)

    def to_batch(self, images) -> torch.Tensor:
        """(N, C, H, W) float tensor on the model's device from any accepted ``images`` (module
        docstring). TypeError for another kind of input, ValueError for tensors of the wrong shape."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != self.in_chans:
                raise ValueError(f"an image tensor batch must be (N, {self.in_chans}, H, W), got shape "
                                 f"{tuple(images.shape)}; for one ({self.in_chans}, H, W) image pass [image] or "
                                 "image[None]")
            return images.to(self.device)
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError(f"images must be a non-empty list of PIL images, paths or (3, H, W) tensors, or an "
                            f"(N, 3, H, W) tensor; got {_describe(images)}")
        tensors = [self._to_tensor(image, index) for index, image in enumerate(images)]
        shapes = sorted({tuple(tensor.shape) for tensor in tensors})
        if len(shapes) > 1:
            raise ValueError(f"the image tensors have different shapes {shapes}; pass PIL images or paths to have "
                             "them resized and cropped to one size")
        return torch.stack(tensors).to(self.device)

    def _to_tensor(self, image, index: int) -> torch.Tensor:
        if isinstance(image, (str, os.PathLike, Image.Image)) and self.in_chans != 3:
            raise TypeError(f"images[{index}] is {_describe(image)}, read as RGB, but the model takes {self.in_chans} "
                            f"channels; pass ({self.in_chans}, H, W) tensors normalised as in training")
        if isinstance(image, (str, os.PathLike)):
            image = load_rgb_image(image)
        if isinstance(image, Image.Image):
            return self.transform(image.convert("RGB"))
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != self.in_chans:
                raise ValueError(f"images[{index}] must be a ({self.in_chans}, H, W) tensor, got shape "
                                 f"{tuple(image.shape)}")
            return image
        raise TypeError(f"images[{index}] is {_describe(image)}; expected a PIL image, a path (str or Path) or a "
                        f"({self.in_chans}, H, W) tensor (a numpy array: PIL.Image.fromarray(array) or "
                        "torch.from_numpy)")

    @torch.no_grad()
    def pooled(self, images) -> torch.Tensor:
        """(N, C) pooled embeddings, float32, on the model's device."""
        with amp_autocast(self.device.type, self.amp):
            return extract_pooled(self.model, self.to_batch(images)).float()

    @torch.no_grad()
    def stages(self, images) -> list[torch.Tensor]:
        """The four stage maps, float32, on the model's device."""
        with amp_autocast(self.device.type, self.amp):
            return [stage.float() for stage in extract_stages(self.model, self.to_batch(images))]

    @torch.no_grad()
    def pooled_and_stages(self, images) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Both, from one forward pass."""
        with amp_autocast(self.device.type, self.amp):
            pooled, stages = extract_pooled_and_stages(self.model, self.to_batch(images))
        return pooled.float(), [stage.float() for stage in stages]


def _describe(value) -> str:
    kind = type(value)
    return f"a {kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else f"a {kind.__name__}"


@torch.no_grad()
def extract_dataset(extractor: FeatureExtractor, loader: DataLoader, with_stages: bool = False,
                    log_every: int = 10) -> dict[str, torch.Tensor]:
    """Features of every batch of ``loader`` (in order), on CPU: ``pooled`` (N, C), ``labels``
    (N,) and with ``with_stages`` ``stage0``..``stage3``. Logs progress every ``log_every`` batches."""
    pooled, labels = [], []
    stages: list[list[torch.Tensor]] = [[] for _ in range(NUM_STAGES)]
    total = len(loader.dataset)
    done, start = 0, time.perf_counter()
    for batch_index, (images, targets) in enumerate(progress_bar(loader, "features", len(loader), "batch")):
        if with_stages:
            batch_pooled, batch_stages = extractor.pooled_and_stages(images)
            for kept, stage in zip(stages, batch_stages):
                kept.append(stage.cpu())
        else:
            batch_pooled = extractor.pooled(images)
        pooled.append(batch_pooled.cpu())
        labels.append(torch.as_tensor(targets, dtype=torch.int64))
        done += len(images)
        if (batch_index + 1) % log_every == 0 or done == total:
            rate = done / max(time.perf_counter() - start, 1e-9)
            _logger.info("features: %d/%d images  %.1f img/s  eta %s", done, total, rate,
                         format_duration((total - done) / rate))
    features = {"pooled": torch.cat(pooled), "labels": torch.cat(labels)}
    if with_stages:
        features.update({f"stage{i}": torch.cat(kept) for i, kept in enumerate(stages)})
    return features


def save_features(path: str | os.PathLike, features: dict[str, torch.Tensor], class_names: Sequence[str],
                  paths: Sequence[str], metadata: Optional[dict[str, str]] = None) -> Path:
    """Write ``features`` with class names and file paths to ``.safetensors`` or ``.npz`` (atomic)."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--output {path}: the file name must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        text = {"class_names": json.dumps(list(class_names)), "paths": json.dumps(list(paths)), **(metadata or {})}
        return save_safetensors(features, path, text)
    arrays = {name: tensor.numpy() for name, tensor in features.items()}
    arrays.update(class_names=np.array(list(class_names), dtype=str), paths=np.array(list(paths), dtype=str))
    arrays.update({key: np.array(value, dtype=str) for key, value in (metadata or {}).items()})
    return atomic_write(path, lambda file: np.savez(file, **arrays))


def load_features(path: str | os.PathLike) -> dict:
    """Inverse of ``save_features``: tensors by name plus ``class_names`` and ``paths`` lists
    (and any other metadata strings)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        loaded: dict = load_file(path)
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
        for key, value in metadata.items():
            loaded[key] = json.loads(value) if key in ("class_names", "paths") else value
        return loaded
    with np.load(path, allow_pickle=False) as arrays:
        loaded = {}
        for key in arrays.files:
            array = arrays[key]
            if array.dtype.kind == "U":
                loaded[key] = array.tolist()
            else:
                loaded[key] = torch.from_numpy(array)
        return loaded


def build_parser() -> TrainingArgumentParser:
    parser = TrainingArgumentParser(
        prog="python -m finetune.features",
        description="Write pooled features (and optionally the four stage maps) of every image in a folder.",
    )
    parser.add_argument("--model", required=True, help="convnextv2_<atto|...|huge>")
    parser.add_argument("--checkpoint", default=None,
                        help="any checkpoint models.load_pretrained reads; omitted: random initialisation")
    parser.add_argument("--data_path", required=True, help="folder of class folders: <data_path>/<class>/<image>")
    parser.add_argument("--output", required=True, help="output file, .safetensors or .npz")
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--crop_pct", type=float, default=None,
                        help="resize to input_size / crop_pct then center-crop (default 0.875; "
                             "plain resize from 384 px)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--stages", action="store_true", help="also write the four stage feature maps")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--device", default=None, help="cpu | cuda | mps (default: CUDA, then MPS, then CPU)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = build_parser()
    require_supported_versions(parser.prog)
    args = parser.parse_args(argv)
    setup_logging()
    if Path(args.output).suffix not in OUTPUT_SUFFIXES:
        parser.error(f"--output {args.output}: the file name must end in {' or '.join(OUTPUT_SUFFIXES)}")
    try:
        models.check_model_name(args.model)
        device = choose_device(args.device)
        dataset = ImageFolderSkippingUnreadable(args.data_path, build_eval_transform(args.input_size, args.crop_pct))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    try:
        extractor = FeatureExtractor(args.model, args.checkpoint, device, args.amp, args.input_size, args.crop_pct)
    except (ValueError, FileNotFoundError) as error:  # unreadable, unsafe or of another model size
        parser.error(f"--checkpoint {args.checkpoint}: {error}")
    _logger.info("%s from %s: %d images in %d classes under %s", args.model,
                 args.checkpoint or "random initialisation", len(dataset), len(dataset.classes), args.data_path)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers, shuffle=False)
    features = extract_dataset(extractor, loader, args.stages)
    paths = [path for path, _ in dataset.samples]
    unreadable = set(dataset.unreadable_paths())
    if unreadable:  # the dataset put the next readable image in their place; drop those rows
        keep = torch.tensor([path not in unreadable for path in paths])
        features = {name: tensor[keep] for name, tensor in features.items()}
        paths = [path for path in paths if path not in unreadable]
        _logger.warning("left out %d unreadable images", len(unreadable))
    metadata = {"model_name": args.model, "checkpoint": str(args.checkpoint), "input_size": str(args.input_size),
                "crop_pct": str(args.crop_pct)}
    path = save_features(args.output, features, dataset.classes, paths, metadata)
    _logger.info("wrote %s: pooled %s, labels %s%s", path, tuple(features["pooled"].shape),
                 tuple(features["labels"].shape), ", stage0..stage3" if args.stages else "")
    return path


if __name__ == "__main__":
    main()
