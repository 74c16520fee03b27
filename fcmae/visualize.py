"""Pictures of what FCMAE reconstructs: pretraining's ``reconstruction.png``, and the same picture
for any pretraining checkpoint and any images.

One row per image; the columns are labelled in the picture itself:

    original | masked input (hidden patches grey) | reconstruction | reconstruction + visible
    | reconstruction + visible (visible stats)        <- with norm_pix_loss only

Images of another channel count than 3 are shown as what a picture can show: one or two
channels as gray (the first channel), more than three as the first three in RGB.

With ``norm_pix_loss`` the model predicts each hidden patch normalised to zero mean and unit
variance; "reconstruction" un-normalises it with the mean and std of the *true* patch, so its
brightness and contrast come from the ground truth, not from the model. The last column uses
the mean and std of the image's visible patches instead (one pair per image): only what the
model saw. A legend under the grid says so.

CLI (needs a full pretraining checkpoint: the decoder is not in ``encoder.safetensors``)::

    python -m fcmae.visualize --checkpoint output/pretrain_demo/checkpoint-8.pth --output recon.png
    python -m fcmae.visualize --checkpoint CKPT --images photo.jpg more_photos/ --seed 1 --output recon.png

Without ``--images`` it draws the run's own picture: the images of its ``--data_path`` (or the
embedded photos) chosen, transformed and masked as pretraining does, so with the same
checkpoint, seed and device it equals that epoch's ``reconstruction.png`` pixel for pixel.
Model, input size, mask ratio, seed, ``norm_pix_loss`` and backend default to the values saved
in the checkpoint; the stem stride (mask patch 32 or 16) and channel count come from its
weights. Image selection (``fixed_visual_batch``): up to 8 images spread evenly over the sorted
file list (folders are searched recursively, ImageFolder order; WebDataset shards: their samples
in order), each resized (short side) and center-cropped to ``--input_size``; the mask is the
model's own, drawn from ``--seed``.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import models
import torch
from models.checkpoint import unwrap_state
from PIL import Image, ImageDraw, ImageFont
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid, save_image

from engine.config import BooleanFlag, Check, TrainingArgumentParser, validate
from engine.progress_bar import progress_bar

from .model import FCMAE, patchify, unpatchify

_logger = logging.getLogger(__name__)

HIDDEN_GREY = 0.5  # display value of hidden patches in the "masked input" column
VISUAL_IMAGES = 8  # rows of the picture
PADDING = 2  # pixels between tiles (white)
COLUMN_LABELS = ("original", "masked input", "reconstruction", "reconstruction + visible",
                 "reconstruction + visible (visible stats)")
NORM_PIX_LEGEND = (
    "norm_pix_loss: 'reconstruction' shows each predicted patch with the mean and std of the TRUE patch, "
    "so its brightness and contrast come from the ground truth. The last column uses the mean and std of "
    "the image's visible patches instead: only what the model saw."
)
PIXEL_LEGEND = "Predictions are pixels (norm_pix_loss off): shown as predicted."
DECODER_KEYS = ("proj.weight", "mask_token", "pred.weight")


def predicted_images(
    images: torch.Tensor, pred: torch.Tensor, norm_pix_loss: bool, patch_size: int = 32
) -> torch.Tensor:
    """(N, L, p*p*C) predicted patches -> (N, C, H, W) in the space of ``images``; with
    ``norm_pix_loss`` each patch takes the mean and std of the matching true patch."""
    pred = pred.float()
    if norm_pix_loss:
        target = patchify(images.float(), patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    grid_size = (images.shape[2] // patch_size, images.shape[3] // patch_size)
    return unpatchify(pred, grid_size, patch_size)


def predicted_images_visible_stats(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int = 32
) -> torch.Tensor:
    """(N, L, p*p*C) norm-pix predictions -> (N, C, H, W), every patch un-normalised with the mean
    and std of all visible pixels of its image (mask: (N, L), 1 = hidden)."""
    target = patchify(images.float(), patch_size)  # (N, L, D)
    visible = (1.0 - mask.float()).unsqueeze(-1)  # (N, L, 1)
    count = visible.sum(dim=(1, 2)) * target.shape[-1]
    mean = (target * visible).sum(dim=(1, 2)) / count
    var = ((target - mean[:, None, None]) ** 2 * visible).sum(dim=(1, 2)) / (count - 1)
    pred = pred.float() * (var + 1e-6)[:, None, None] ** 0.5 + mean[:, None, None]
    grid_size = (images.shape[2] // patch_size, images.shape[3] // patch_size)
    return unpatchify(pred, grid_size, patch_size)


def _pixel_mask(mask: torch.Tensor, images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, L) cell mask -> (N, 1, H, W), 1 = hidden pixel."""
    grid_h, grid_w = images.shape[2] // patch_size, images.shape[3] // patch_size
    cells = mask.float().reshape(-1, 1, grid_h, grid_w)
    return cells.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def reconstruction_columns(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    norm_pix_loss: bool,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    patch_size: int = 32,
) -> list[torch.Tensor]:
    """The picture's columns, each (N, 3, H, W) in [0, 1], in ``COLUMN_LABELS`` order (the last
    one with ``norm_pix_loss`` only). images: (N, C, H, W) normalised with ``mean``/``std`` (one
    value per channel; values of another count, such as ImageNet's three for a 1-channel image,
    are averaged into one for every channel); pred: (N, L, p*p*C) model output; mask: (N, L),
    1 = hidden. Channels are shown as the module docstring says."""
    images, pred, mask = images.detach().cpu(), pred.detach().cpu(), mask.detach().cpu()
    mean_t = _per_channel(mean, images.shape[1])
    std_t = _per_channel(std, images.shape[1])

    def to_display(normalised: torch.Tensor) -> torch.Tensor:
        return _as_rgb((normalised.float() * std_t + mean_t).clamp(0.0, 1.0))

    hidden = _pixel_mask(mask, images, patch_size)
    original = to_display(images)
    prediction = to_display(predicted_images(images, pred, norm_pix_loss, patch_size))
    columns = [original, original * (1 - hidden) + HIDDEN_GREY * hidden, prediction,
               original * (1 - hidden) + prediction * hidden]
    if norm_pix_loss:
        visible_stats = to_display(predicted_images_visible_stats(images, pred, mask, patch_size))
        columns.append(original * (1 - hidden) + visible_stats * hidden)
    return columns


def _per_channel(values: Sequence[float], channels: int) -> torch.Tensor:
    """(1, C, 1, 1) normalisation statistics: ``values`` if there is one per channel, else their mean."""
    per_channel = torch.tensor(values, dtype=torch.float32)
    if len(per_channel) != channels:
        per_channel = per_channel.mean().expand(channels)
    return per_channel.reshape(1, channels, 1, 1)


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 3, H, W): RGB as is, one or two channels as gray (the first), more than
    three as their first three."""
    if images.shape[1] < 3:
        return images[:, :1].expand(-1, 3, -1, -1)
    return images[:, :3]


def reconstruction_grid(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    norm_pix_loss: bool,
    max_images: int = VISUAL_IMAGES,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    patch_size: int = 32,
) -> torch.Tensor:
    """Labelled picture (3, H', W') in [0, 1] of up to ``max_images`` rows: the
    ``reconstruction_columns`` as a ``make_grid`` grid (``PADDING``), the column labels above it
    and the legend below it."""
    columns = reconstruction_columns(images[:max_images], pred[:max_images], mask[:max_images], norm_pix_loss,
                                     mean, std, patch_size)
    tiles = make_grid(torch.stack(columns, dim=1).flatten(0, 1), nrow=len(columns), padding=PADDING, pad_value=1.0)
    legend = NORM_PIX_LEGEND if norm_pix_loss else PIXEL_LEGEND
    return _add_labels(tiles, COLUMN_LABELS[:len(columns)], images.shape[3], legend)


def _add_labels(tiles: torch.Tensor, labels: Sequence[str], tile_width: int, legend: str) -> torch.Tensor:
    """``tiles`` (3, H, W) with ``labels`` centred above its columns and ``legend`` below, drawn in
    PIL's built-in font (no font files needed); (3, H + header + footer, W) in [0, 1]."""
    picture = to_pil_image(tiles.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8))  # save_image's rounding
    font = _label_font(labels, tile_width)
    line_height = _text_size(font, "Ag")[1] + 2
    label_lines = [_wrap(font, label, tile_width) for label in labels]
    legend_lines = _wrap(font, legend, picture.width - 2 * PADDING)
    header = line_height * max(len(lines) for lines in label_lines) + PADDING
    footer = line_height * len(legend_lines) + 2 * PADDING
    canvas = Image.new("RGB", (picture.width, header + picture.height + footer), "white")
    canvas.paste(picture, (0, header))
    draw = ImageDraw.Draw(canvas)
    for column, lines in enumerate(label_lines):
        centre = PADDING + column * (tile_width + PADDING) + tile_width / 2
        for row, line in enumerate(lines):
            draw.text((centre - _text_size(font, line)[0] / 2, PADDING + row * line_height), line, fill="black",
                      font=font)
    for row, line in enumerate(legend_lines):
        draw.text((PADDING, header + picture.height + PADDING + row * line_height), line, fill="black", font=font)
    return pil_to_tensor(canvas).float() / 255


def _label_font(labels: Sequence[str], tile_width: int):
    """PIL's default font at the largest size (8..14 px) whose longest label word fits a tile."""
    longest = max((word for label in labels for word in label.split()), key=len)
    for size in range(14, 7, -1):
        font = _default_font(size)
        if _text_size(font, longest)[0] <= tile_width:
            return font
    return font


def _default_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return right - left, bottom


def _wrap(font, text: str, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_size(font, f"{lines[-1]} {word}")[0] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


@torch.no_grad()
def visualize_reconstructions(
    model: FCMAE, images: torch.Tensor, seed: int, max_images: int = VISUAL_IMAGES,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """Run ``model`` (an unwrapped FCMAE) in eval mode on ``images`` (normalised with ``mean`` and
    ``std``) with its own random mask, drawn on a CPU generator seeded with ``seed`` (the same
    mask at every call, on any device), and return the picture."""
    was_training = model.training
    model.eval()
    visible_cells = model.random_visible_cells(images, torch.Generator().manual_seed(seed))
    _, pred, mask = model(images, visible_cells)
    model.train(was_training)
    return reconstruction_grid(images, pred, mask, model.norm_pix_loss, max_images, mean, std, model.patch_size)


def save_png(grid: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a (3, H, W) [0, 1] picture as PNG."""
    save_image(grid, os.fspath(path))


def visual_transform(input_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                     std: Sequence[float] = IMAGENET_DEFAULT_STD, decoded: bool = False) -> transforms.Compose:
    """PIL image (``decoded``: a (C, H, W) float tensor in [0, 1], ``engine.image_decode``) ->
    (C, input_size, input_size): bicubic resize of the short side, center crop, normalisation
    with ``mean``/``std``. Deterministic, unlike the training crops."""
    resize = [transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
              transforms.CenterCrop(input_size)]
    return transforms.Compose([*resize, *([] if decoded else [transforms.ToTensor()]), transforms.Normalize(mean, std)])


def fixed_visual_batch(
    source, input_size: int, device: torch.device | str = "cpu", count: int = VISUAL_IMAGES, in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """The images (N, in_chans, S, S) of a reconstruction picture, the same at every call.

    ``source``: ``engine.data.EmbeddedPhotos`` (its first ``count`` items, already cropped), or a
    dataset of image files (``engine.data.ImageFiles``: its ``index`` of paths; no per-image list
    is built) or a sequence of image paths: ``count`` files spread evenly over it, each decoded for
    ``in_chans`` channels and put through ``visual_transform`` with ``mean``/``std`` (an
    unreadable file is replaced by the next readable one). ``visualize_reconstructions`` draws
    their mask.
    """
    from engine.data import EmbeddedPhotos, ImageFiles

    if isinstance(source, EmbeddedPhotos):
        images = torch.stack([source[index][0] for index in range(min(count, len(source)))])
    else:
        paths = source.index if isinstance(source, ImageFiles) else source
        where = getattr(paths, "root", None) or "the images given"
        images = _load_spread(paths, input_size, count, where, in_chans, mean, std)
    return images.to(device)


def _load_spread(paths: Sequence[str | os.PathLike], input_size: int, count: int, where, in_chans: int = 3,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """``count`` images spread evenly over ``paths``, each through ``visual_transform``; an
    unreadable file is replaced by the next readable one. UnreadableDatasetError if none is."""
    from engine.data import UNREADABLE_IMAGE_ERRORS, UnreadableDatasetError
    from engine.image_decode import image_loader

    if not len(paths):
        raise ValueError(f"no images to show in {where}")
    load = image_loader(in_chans)
    transform = visual_transform(input_size, mean, std, decoded=in_chans != 3)
    picked = torch.linspace(0, len(paths) - 1, min(count, len(paths))).long().tolist()
    images, unreadable = [], set()
    for index in progress_bar(picked, "reconstruction picture: loading images", len(picked), "image", log=False):
        for offset in range(len(paths)):
            position = (index + offset) % len(paths)
            if position in unreadable:
                continue
            try:
                images.append(transform(load(paths[position])))
                break
            except UNREADABLE_IMAGE_ERRORS as error:
                unreadable.add(position)
                _logger.warning("reconstruction picture: skipping unreadable image %s (%s)", paths[position], error)
        else:
            raise UnreadableDatasetError(f"all {len(paths)} image files under {where} are unreadable; check the "
                                         "files (e.g. open one with PIL)")
    return torch.stack(images)


def image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named in ``inputs`` (files, or folders searched recursively), each folder's in
    ImageFolder order (sorted by path components); ValueError naming an input without images."""
    found: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_file():
            found.append(entry)
        elif entry.is_dir():
            inside = [path for path in progress_bar(entry.rglob("*"), f"scanning {entry}", unit="file", log=False)
                      if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS]
            if not inside:
                raise ValueError(f"--images {entry}: no image files ({', '.join(IMG_EXTENSIONS)}) in this folder")
            found += sorted(inside, key=lambda path: path.relative_to(entry).parts)
        else:
            raise ValueError(f"--images {entry}: no such file or folder")
    return found


def load_fcmae(path: str | os.PathLike, model_name: Optional[str] = None, backend: Optional[str] = None,
               norm_pix_loss: Optional[bool] = None, mask_ratio: Optional[float] = None) -> tuple[FCMAE, dict]:
    """The whole FCMAE (encoder and decoder) of a pretraining checkpoint, in eval mode, and the
    configuration saved with it (``{}`` if none). Unset arguments come from that configuration;
    decoder width and depth, stem stride and input channels from the tensors. ValueError for a
    file without a decoder."""
    from fcmae import build_fcmae

    checkpoint = models.read_checkpoint(path)
    state = unwrap_state(checkpoint)
    if not all(key in state for key in DECODER_KEYS):
        raise ValueError(
            f"{path} has no FCMAE decoder (proj, mask_token, decoder, pred), so it cannot reconstruct images. "
            "The decoder is saved only in pretraining checkpoints (checkpoint-<epoch>.pth in pretrain.py's "
            "--output_dir); encoder-only files such as encoder.safetensors or the official *_fcmae.pt lack it.")
    config = checkpoint.get("config", {}) if isinstance(checkpoint, Mapping) else {}
    saved_model = config.get("model")
    if model_name is not None and saved_model is not None and model_name != saved_model:
        raise ValueError(f"--model {model_name}: {path} holds a {saved_model}; use --model {saved_model}")
    model_name = model_name or saved_model or models.checkpoint.infer_model_name(
        {key[len("encoder."):]: value for key, value in state.items() if key.startswith("encoder.")})
    models.check_model_name(model_name)
    backend = backend or config.get("backend", "sparse")
    if backend == "minkowski" and not _minkowski_installed():
        _logger.warning("the run used --backend minkowski, which is not installed here; using sparse (same numbers "
                        "to float tolerance, so a few pixels may differ from the run's picture)")
        backend = "sparse"
    norm_pix_loss = config.get("norm_pix_loss", True) if norm_pix_loss is None else norm_pix_loss
    decoder_depth = len({key.split(".")[1] for key in state if key.startswith("decoder.")})
    stem_stride, in_chans = models.stem_geometry(state["encoder.stem.0.weight"])
    mask_ratio = config.get("mask_ratio", 0.6) if mask_ratio is None else mask_ratio
    model = build_fcmae(model_name, backend, mask_ratio, state["proj.weight"].shape[0], decoder_depth, norm_pix_loss,
                        stem_stride=stem_stride, in_chans=in_chans)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit an FCMAE {model_name}: {error}") from error
    return model.eval(), config


def _minkowski_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("MinkowskiEngine") is not None


def build_parser() -> TrainingArgumentParser:
    parser = TrainingArgumentParser(
        prog="python -m fcmae.visualize",
        description="Reconstruction picture of a pretraining checkpoint (the run's own images, or --images).",
        epilog="Unset options take the values saved in the checkpoint.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint-<epoch>.pth written by pretrain.py")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--images", nargs="+", default=None,
                        help="image files and/or folders (default: the run's --data_path, or the embedded photos)")
    parser.add_argument("--model", default=None, help="convnextv2_<size> (default: the checkpoint's)")
    parser.add_argument("--input_size", type=int, default=None,
                        help="multiple of the mask patch, 32 (16 with a stride-2 stem) (default: the run's)")
    parser.add_argument("--mask_ratio", type=float, default=None, help="fraction hidden (default: the run's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the mask (default: the run's --seed)")
    parser.add_argument("--max_images", type=int, default=VISUAL_IMAGES, help="rows of the picture")
    parser.add_argument("--norm_pix_loss", action=BooleanFlag, default=None,
                        help="how predictions are un-normalised (default: as the run was trained)")
    parser.add_argument("--backend", choices=list(models.BACKENDS), default=None, help="default: the run's")
    parser.add_argument("--device", default=None, help="cpu | cuda | mps (default: CUDA, then MPS, then CPU)")
    return parser


VISUALIZE_CHECKS = (  # on the values in use: given, or the checkpoint's
    Check("--output", lambda a: Path(a.output).suffix.lower() == ".png", "the file name must end in .png"),
    Check("--input_size", lambda a: a.input_size % a.patch_size == 0,
          "must be a multiple of the checkpoint's mask patch (32; 16 with a stride-2 stem), e.g. 224"),
    Check("--mask_ratio", lambda a: 0.0 <= a.mask_ratio < 1.0, "must be in [0, 1): the fraction of patches hidden"),
    Check("--max_images", lambda a: a.max_images >= 1, "must be >= 1 (rows of the picture)"),
)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    from engine.compat import require_supported_versions
    from engine.data import EmbeddedPhotos, UnreadableDatasetError, pretraining_source
    from engine.distributed import choose_device
    from engine.index_cache import INDEX_CACHE_NAME, IndexCache
    from engine.logging import setup_logging
    from engine.shards import SHARD_INDEX_NAME, ShardIndexCache, is_shard_source

    parser = build_parser()
    require_supported_versions(parser.prog)
    args = parser.parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    try:
        device = choose_device(args.device)
        model, config = load_fcmae(args.checkpoint, args.model, args.backend, args.norm_pix_loss)
        input_size = args.input_size = args.input_size or config.get("input_size", 224)
        args.mask_ratio = model.mask_ratio if args.mask_ratio is None else args.mask_ratio
        args.patch_size = model.patch_size
        seed = config.get("seed", 0) if args.seed is None else args.seed
        validate(args, VISUALIZE_CHECKS)
        model.mask_ratio = args.mask_ratio
        mean, std = config.get("mean") or IMAGENET_DEFAULT_MEAN, config.get("std") or IMAGENET_DEFAULT_STD
        if args.images is not None:
            source, described = image_paths(args.images), " ".join(args.images)
        elif is_shard_source(config.get("data_path")):  # the run's shard index, reused while the shards are unchanged
            source = ShardIndexCache(Path(args.checkpoint).parent / SHARD_INDEX_NAME).load_or_build(config["data_path"])
            described = f"the run's --data_path ({config['data_path']})"
        elif config.get("data_path"):  # the run's scan, reused while the data is unchanged
            data = pretraining_source(config["data_path"])
            source = IndexCache(Path(args.checkpoint).parent / INDEX_CACHE_NAME).load_or_scan(data).index
            described = f"the run's --data_path ({data})"
        else:
            source = EmbeddedPhotos("train", input_size, config.get("embedded_samples", args.max_images))
            described = "the embedded photos the run trained on"
        images = fixed_visual_batch(source, input_size, device, args.max_images, model.encoder.in_chans, mean, std)
    except (ValueError, OSError, UnreadableDatasetError) as error:
        parser.error(str(error))
    picture = visualize_reconstructions(model.to(device), images, seed, args.max_images, mean, std)
    save_png(picture, args.output)
    _logger.info("wrote %s: %d images from %s, %d px, mask ratio %.2f, seed %d, in %.1f s", args.output, len(images),
                 described, input_size, model.mask_ratio, seed, time.perf_counter() - start)
    return Path(args.output)


if __name__ == "__main__":
    main()
