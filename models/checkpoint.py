"""Load ConvNeXt V2 weights from any supported checkpoint layout into timm's dense model.

Layouts, told apart by their key names (after unwrapping, see below):

* ``timm`` (ours): ``stem.*``, ``stages.<i>.blocks.<j>.*``, optional ``head.norm.*`` /
  ``head.fc.*``. What ``encoder_export_state`` (``encoder.safetensors``) and a fine-tuned
  timm model write; a pretraining checkpoint holds the encoder under ``encoder.``.
* ``official_dense``: the released ``convnextv2_<size>_1k_224_fcmae.pt`` (encoder only) and
  ``..._ema.pt`` (fine-tuned) files: ``downsample_layers.<i>.<j>.*``,
  ``stages.<i>.<j>.{dwconv,norm,pwconv1,grn,pwconv2}.*`` with GRN ``gamma``/``beta`` shaped
  (1, 1, 1, 4C), final ``norm.*`` and classifier ``head.*``.
* ``official_minkowski``: checkpoints written by the official FCMAE pretraining code, whose
  encoder is built from MinkowskiEngine modules: convolutions hold a ``.kernel`` (one matrix
  per kernel offset, see ``minkowski_kernel_to_conv_weight``) and a (1, C) bias, layer norms
  and linears wrap ``nn.LayerNorm`` / ``nn.Linear`` as ``.ln.*`` / ``.linear.*``, GRN
  ``gamma``/``beta`` are (1, 4C).

Wrappers removed before that: nested ``{"model": ...}`` / ``{"state_dict": ...}`` dicts,
``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes, and the
``encoder.`` prefix of a whole FCMAE model, whose decoder (``proj``, ``mask_token``,
``decoder``, ``pred``) is dropped.

Files are read with safetensors or ``torch.load(weights_only=True)``, chosen by the file's
first bytes (not its name): nothing in a checkpoint can run code, and a file that is none of
these (text, an image, an empty or truncated file, a folder) gets an error saying what it is.

Stem geometry: a checkpoint's stem conv weight (C, in_chans, k, k) says its stem stride (k)
and input channels, so loading needs no flag for them. Asked for another geometry,
``fit_stem`` adapts the stem instead of refusing it: the channels with timm's
``adapt_input_conv`` (1 channel: the sum over the source channels; N: the source channels
repeated, scaled by source / N), the kernel with ``resample_stem_kernel`` (exact for
nearest-neighbour upscaled or block-averaged images, see there).

``encoder_export_state(encoder)`` is what pretraining writes to ``encoder.safetensors``: the
encoder's tensors plus ``head.norm`` at timm's initialisation, i.e. exactly the state dict of
``create_dense_model("convnextv2_<size>", stem_stride, in_chans, num_classes=0)`` (with the
paper's stem, ``timm.create_model("convnextv2_<size>", num_classes=0, in_chans=in_chans)``), so a
strict ``load_state_dict`` works.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from timm.models import adapt_input_conv

from .convnextv2 import (DEFAULT_IN_CHANS, DEFAULT_STEM_STRIDE, MODEL_CONFIGS, check_model_name, create_dense_model,
                         stem_geometry)

_logger = logging.getLogger(__name__)

CONTAINER_KEYS = ("model", "state_dict")  # training checkpoints nest the weights under these
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
ENCODER_PREFIX = "encoder."  # a whole FCMAE model: the encoder is what we keep
MINKOWSKI_SUFFIXES = (".kernel", ".ln.weight", ".linear.weight")
STEM_WEIGHT = "stem.0.weight"
MAX_LISTED_KEYS = 10  # per category in error messages
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_PROTOCOL_OPCODE = b"\x80"  # first byte of a pickle of protocol >= 2 (legacy torch.save)
SNIFFED_BYTES = 16
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt", ".tar")

# Official dense names -> timm names, applied in order (``head.`` before ``norm.``: the
# final norm becomes ``head.norm``, the classifier ``head.fc``). Same facts as timm's
# ``convnext.checkpoint_filter_fn``.
_OFFICIAL_TO_TIMM = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^downsample_layers\.0\.", "stem."),
        (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
        (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
        (r"\.dwconv\.", ".conv_dw."),
        (r"\.pwconv(\d)\.", r".mlp.fc\1."),
        (r"\.grn\.gamma$", ".mlp.grn.weight"),
        (r"\.grn\.beta$", ".mlp.grn.bias"),
        (r"^head\.", "head.fc."),
        (r"^norm\.", "head.norm."),
    )
)
_MLP_WEIGHT = re.compile(r"\.mlp\.fc\d\.weight$")
_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


def read_checkpoint(path: str | Path) -> Mapping:
    """The object stored in ``path``: a safetensors file or a plain-tensor torch file.

    The format is told from the first bytes (``file_format``), so a safetensors file named
    ``.pth`` loads too. Torch files are unpickled with ``weights_only=True``;
    ``argparse.Namespace`` (the ``args`` entry of official training checkpoints, a plain
    attribute bag) is the one extra class allowed. Raises FileNotFoundError for a missing path
    and ValueError, naming the file and what it is, for a folder, a file that is not a
    checkpoint, a truncated one, or a pickle that needs code to load.
    """
    path = Path(path)
    file_kind = file_format(path)
    if file_kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as error:
            raise ValueError(f"{path} is a damaged safetensors file ({error}); it may be truncated") from error
    try:  # an open file: torch.load would pick its reader from the name (.safetensors) otherwise
        with allowing_namespaces(), open(path, "rb") as file:
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(error))
        if blocked is None:  # not a refusal: the pickle itself is damaged
            raise ValueError(f"{path} is a damaged PyTorch checkpoint: its pickle data cannot be read "
                             f"({error}); it may be truncated") from error
        raise ValueError(
            f"{path} is not a plain tensor checkpoint: unpickling it would run code named in the "
            f"file (it refers to {blocked.group(1)}), so it was not loaded. Re-save its weights from a "
            f"trusted environment, e.g. torch.save(model.state_dict(), ...) or safetensors."
        ) from error
    except (RuntimeError, EOFError, KeyError, OSError) as error:  # truncated zip, cut-off pickle
        archive = "zip archive" if file_kind == "zip" else "pickle"
        raise ValueError(f"{path} is a damaged PyTorch checkpoint: its {archive} cannot be read "
                         f"({type(error).__name__}: {error}); it may be truncated") from error


SAFE_GLOBALS_CONTEXT = hasattr(torch.serialization, "safe_globals")  # torch >= 2.5


def allowing_namespaces() -> contextlib.AbstractContextManager:
    """A context in which ``torch.load(weights_only=True)`` also accepts ``argparse.Namespace``.
    torch 2.4 has only the process-wide list: there, Namespace is added to it for good."""
    if SAFE_GLOBALS_CONTEXT:
        return torch.serialization.safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def file_format(path: str | Path) -> str:
    """``"zip"`` or ``"pickle"`` (the two formats of ``torch.save``) or ``"safetensors"``, read from
    the first bytes of ``path``. FileNotFoundError if it does not exist; ValueError naming the file
    and what it is instead for a folder, an empty file or anything else (text, an image, ...)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        hint = f"pass a file in it: {_listing(inside)}" if inside else \
            f"it holds no {'/'.join(CHECKPOINT_SUFFIXES)} files"
        raise ValueError(f"{path} is a folder, not a checkpoint file; {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a checkpoint; it may be a save that never finished")
    with open(path, "rb") as file:
        head = file.read(SNIFFED_BYTES)
    # safetensors: u64 little-endian header length, then the JSON header (checked first: the
    # length's low byte may be 0x80)
    header_length = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and header_length <= size - 8:
        return "safetensors"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(PICKLE_PROTOCOL_OPCODE):
        return "pickle"
    if head[8:9] == b"{":
        raise ValueError(f"{path} is a truncated safetensors file: its header alone is {header_length} bytes "
                         f"but the file has {size}")
    looks_like = "text" if all(32 <= b < 127 or b in b"\t\n\r" for b in head) else "binary data"
    raise ValueError(
        f"{path} is not a checkpoint: it starts with {head!r} ({looks_like}), but a PyTorch checkpoint is "
        "a zip archive or a pickle and a safetensors file starts with its header length. Pass the file "
        "written by torch.save or safetensors (e.g. checkpoint-<epoch>.pth or encoder.safetensors)."
    )


def encoder_export_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Complete timm ``num_classes=0`` state dict of an FCMAE encoder (``SparseConvNeXtV2``).

    The encoder's own ``stem.*`` and ``stages.*`` tensors plus ``head.norm.weight`` = 1 and
    ``head.norm.bias`` = 0, timm's initialisation of the head LayerNorm, which FCMAE never
    trains. ``create_dense_model(name, encoder.stem_stride, encoder.in_chans, num_classes=0)
    .load_state_dict(state)`` is then strict (for the paper's stem that model is
    ``timm.create_model(name, num_classes=0, in_chans=...)``), and the pooled features (``forward_head(pre_logits=True)``: global average pool, then the
    head norm) are the average-pooled last stage standardised per image across channels: the
    same features as a model loaded from an official FCMAE file, whose final norm also starts
    at weight 1, bias 0.
    """
    state = dict(encoder.state_dict())
    reference = state[STEM_WEIGHT]
    width = encoder.dims[-1]
    state["head.norm.weight"] = torch.ones(width, dtype=reference.dtype, device=reference.device)
    state["head.norm.bias"] = torch.zeros(width, dtype=reference.dtype, device=reference.device)
    return state


def convert_to_timm(checkpoint: Mapping, model_name: str) -> dict[str, torch.Tensor]:
    """State dict in timm ``model_name`` names and shapes, from any supported layout.

    ``checkpoint`` may be a bare state dict or a training checkpoint wrapping one (see the
    module docstring). Shapes are converted, not checked: a checkpoint of another size comes
    back with its own shapes, and ``load_pretrained`` reports the mismatch.
    """
    check_model_name(model_name)
    state = encoder_part(unwrap_state(checkpoint))
    layout = detect_layout(state)
    if layout == "official_minkowski":
        state = _minkowski_to_official_dense(state)
    if layout in ("official_minkowski", "official_dense"):
        state = official_dense_to_timm(state)
    _logger.info("checkpoint layout: %s (%d tensors)", layout, len(state))
    return _fit_mlp_weights(state, _timm_shapes(model_name))


def load_pretrained(
    model_name: str,
    path: str | Path,
    num_classes: int | None = None,
    strict_encoder: bool = True,
    stem_stride: int | None = None,
    in_chans: int | None = None,
    **timm_kwargs,
) -> nn.Module:
    """Dense timm ConvNeXt V2 ``model_name`` initialised from the checkpoint at ``path``.

    Args:
        model_name: ``convnextv2_<size>``.
        path: any supported checkpoint (module docstring).
        num_classes: classifier size; None takes the checkpoint's when it has a classifier,
            else timm's default. The classifier (``head.fc``) is loaded only when its shape
            matches, otherwise it keeps its fresh initialisation. The head LayerNorm
            (``head.norm``) is loaded whenever the checkpoint has it; where it has none
            (pretraining checkpoints, official FCMAE files) it keeps timm's initialisation,
            weight 1 and bias 0, the values ``encoder.safetensors`` holds.
        strict_encoder: every encoder tensor (stem, stages) must be present with the model's
            shape, and no unknown tensor may be left over; otherwise ValueError listing the
            mismatches and the model size the checkpoint looks like. False turns that into a
            warning and loads the tensors that fit.
        stem_stride, in_chans: the model's stem stride (timm's ``patch_size``) and input
            channels; None: the checkpoint's (read from its stem weight). Another value adapts
            the stem (``fit_stem``), logged.
        **timm_kwargs: passed to ``timm.create_model`` (drop_path_rate, ...).
    """
    state, adapted = fit_stem(convert_to_timm(read_checkpoint(path), model_name), stem_stride, in_chans)
    if num_classes is None and "head.fc.weight" in state:
        num_classes = state["head.fc.weight"].shape[0]
    if num_classes is not None:
        timm_kwargs["num_classes"] = num_classes
    stem_stride, in_chans = _stem_or_default(state)
    model = create_dense_model(model_name, stem_stride, in_chans, **timm_kwargs)
    expected = model.state_dict()

    problems = encoder_mismatch(path, model_name, state, expected)
    if problems:
        if strict_encoder:
            raise ValueError(problems)
        warnings.warn(problems, stacklevel=2)

    loadable = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(loadable, strict=False)
    head = "loaded" if "head.fc.weight" in loadable else "newly initialised"
    _logger.info("loaded %d/%d tensors of %s from %s; classifier %s%s", len(loadable), len(expected), model_name, path,
                 head, "".join(f"; adapted {change}" for change in adapted))
    return model


def encoder_mismatch(path, model_name: str, state: Mapping[str, torch.Tensor],
                     expected: Mapping[str, torch.Tensor]) -> str | None:
    """None if ``state`` (timm names) has every encoder tensor of ``expected`` (a model's state
    dict) with its shape and nothing unknown; else a message listing the mismatched, missing and
    unexpected keys and naming the model size the checkpoint at ``path`` looks like. The
    classifier (``head.fc``) may differ and ``head.norm`` may be missing."""
    problems = _encoder_problems(state, expected)
    return _describe_problems(path, model_name, state, **problems) if any(problems.values()) else None


def fit_stem(state: Mapping[str, torch.Tensor], stem_stride: int | None = None,
             in_chans: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` (timm names) with its stem conv weight fitted to ``stem_stride`` and ``in_chans``
    (None: keep the checkpoint's), and one line per change for the log (empty: nothing changed).

    Channels: timm's ``adapt_input_conv`` (one channel: the sum over the source channels; N: the
    source channels repeated and scaled by source / N). Kernel: ``resample_stem_kernel``.
    """
    state = dict(state)
    if STEM_WEIGHT not in state:
        return state, []  # load_pretrained reports it missing
    weight = state[STEM_WEIGHT]
    source_stride, source_chans = stem_geometry(weight)
    changes = []
    if in_chans is not None and in_chans != source_chans:
        weight = adapt_input_conv(in_chans, weight, base_chans=source_chans)
        rule = "summed" if in_chans == 1 else f"repeated, scaled by {source_chans}/{in_chans}"
        changes.append(f"{STEM_WEIGHT}: {source_chans} -> {in_chans} input channels ({rule}, timm's adapt_input_conv)")
    if stem_stride is not None and stem_stride != source_stride:
        weight = resample_stem_kernel(weight, stem_stride)
        rule = "each tap the sum of the taps it covers" if stem_stride < source_stride else \
            "each tap spread evenly over the taps it covers"
        changes.append(f"{STEM_WEIGHT}: {source_stride}x{source_stride} stride-{source_stride} kernel -> "
                       f"{stem_stride}x{stem_stride} stride-{stem_stride} ({rule})")
    state[STEM_WEIGHT] = weight
    return state, changes


def resample_stem_kernel(weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """A k x k stride-k stem conv weight (C, in, k, k) -> (C, in, t, t) for a t x t stride-t stem,
    where one of k, t divides the other (4 -> 2, 2 -> 4, ...). Both preserve a constant image's
    response (the sum of the taps), and each is exact for the image scale it implies:

    * shrinking (k = f t): each new tap is the sum of the f x f old taps it covers, so the new
      stem on an image gives exactly what the old stem gives on that image upscaled f times
      (nearest neighbour): the stride-2 stem sees a small image as the stride-4 stem saw it
      at twice the size;
    * growing (t = f k): each old tap is spread evenly over f x f new taps, so the new stem on
      an image gives exactly what the old stem gives on it averaged over f x f blocks.
    """
    source = weight.shape[-1]
    if kernel_size == source:
        return weight
    if source % kernel_size == 0:
        factor = source // kernel_size
        return weight.unflatten(3, (kernel_size, factor)).unflatten(2, (kernel_size, factor)).sum(dim=(3, 5))
    if kernel_size % source == 0:
        factor = kernel_size // source
        return weight.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) / factor**2
    raise ValueError(f"cannot resample a {source}x{source} stem kernel to {kernel_size}x{kernel_size}: one size must "
                     "divide the other (e.g. 4 and 2)")


def _stem_or_default(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(stem stride, input channels) of ``state``'s stem weight, or the defaults without one."""
    if STEM_WEIGHT in state:
        return stem_geometry(state[STEM_WEIGHT])
    return DEFAULT_STEM_STRIDE, DEFAULT_IN_CHANS


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``"timm"``, ``"official_dense"`` or ``"official_minkowski"``, from unwrapped key names."""
    keys = list(state)
    if any(k.startswith("downsample_layers.") for k in keys):
        if any(k.endswith(MINKOWSKI_SUFFIXES) for k in keys):
            return "official_minkowski"
        return "official_dense"
    if any(k.startswith("stem.") or _BLOCK_KEY.match(k) for k in keys):
        return "timm"
    raise ValueError(
        "unrecognised checkpoint layout: expected timm keys (stem.0.weight, "
        "stages.0.blocks.0.conv_dw.weight, ...), official ConvNeXt V2 keys "
        "(downsample_layers.0.0.weight, stages.0.0.dwconv.weight, ...) or official "
        f"MinkowskiEngine keys (stages.0.0.dwconv.kernel, ...); got {_listing(keys)}"
    )


def minkowski_kernel_to_conv_weight(kernel: torch.Tensor) -> torch.Tensor:
    """MinkowskiEngine kernel -> ``nn.Conv2d`` weight.

    ME keeps one matrix per kernel offset: (k*k, in, out) for a convolution, (k*k, C) for a
    depthwise one. Offset ``t = w * k + h`` (``h``: row, ``w``: column): the first spatial
    coordinate varies fastest, ME's hypercube kernel-region order for the (batch, row, column)
    coordinates that ``to_sparse`` builds from an NCHW tensor, and the order the official
    release's own key remapping assumes. Returns (out, in, k, k), or (C, 1, k, k) depthwise.
    """
    kernel_size = math.isqrt(kernel.shape[0])
    if kernel.ndim not in (2, 3) or kernel_size**2 != kernel.shape[0]:
        raise ValueError(f"not a square MinkowskiEngine kernel: shape {tuple(kernel.shape)}")
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(1)  # depthwise: one input channel per output channel
    by_offset = kernel.reshape(kernel_size, kernel_size, *kernel.shape[1:])  # (w, h, in, out)
    return by_offset.permute(3, 2, 1, 0).contiguous()


def infer_model_name(state: Mapping[str, torch.Tensor]) -> str:
    """The ``convnextv2_<size>`` whose depths and dims a timm-named state dict has, or a
    description of them when no size matches."""
    try:
        dims = [state[STEM_WEIGHT].shape[0]]
        dims += [state[f"stages.{i}.downsample.1.weight"].shape[0] for i in range(1, 4)]
    except KeyError:
        return "no known size (stem or downsample weights missing)"
    blocks = {tuple(map(int, m.groups())) for m in map(_BLOCK_KEY.match, state) if m}
    depths = [sum(1 for stage, _ in blocks if stage == i) for i in range(4)]
    for name, config in MODEL_CONFIGS.items():
        if config == (tuple(depths), tuple(dims)):
            return name
    return f"no known size (depths {tuple(depths)}, dims {tuple(dims)})"


def unwrap_state(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's innermost ``model``/``state_dict`` mapping, without the
    ``module.`` / ``_orig_mod.`` prefixes of DistributedDataParallel and torch.compile (an FCMAE
    model keeps its ``encoder.`` prefix and its decoder). ValueError if it holds no tensors."""
    state = checkpoint
    while isinstance(state, Mapping):
        inner = next((state[k] for k in CONTAINER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint holds a {type(state).__name__}, not a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"checkpoint holds no tensors; its entries are {_listing(list(state))}")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                stripped = True
    return tensors


def encoder_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder of an ``unwrap_state`` of a whole FCMAE model (``encoder.*``, prefix removed);
    other states unchanged."""
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        return {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    return state


def _minkowski_to_official_dense(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dense = {}
    for key, value in state.items():
        if key.endswith(".kernel"):
            key, value = key[: -len("kernel")] + "weight", minkowski_kernel_to_conv_weight(value)
        else:
            key = key.replace(".ln.", ".").replace(".linear.", ".")
            if key.endswith(".bias") and value.ndim == 2:  # ME convolution bias is (1, C)
                value = value.reshape(-1)
        dense[key] = value
    return dense


def official_dense_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official dense ConvNeXt V2 names and GRN shapes -> timm's (also right for the blocks of the
    official FCMAE decoder: ``decoder.<j>.dwconv`` -> ``decoder.<j>.conv_dw``, ...)."""
    converted = {}
    for key, value in state.items():
        for pattern, replacement in _OFFICIAL_TO_TIMM:
            key = pattern.sub(replacement, key)
        if ".mlp.grn." in key:
            value = value.reshape(-1)  # (1, 1, 1, C) dense, (1, C) MinkowskiEngine -> (C,)
        converted[key] = value
    return converted


def _fit_mlp_weights(state: dict[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Reshape block MLP weights between Linear (4C, C) and 1x1 conv (4C, C, 1, 1): timm uses
    convs for atto..nano (``conv_mlp=True``), Linear from tiny up; checkpoints vary."""
    fitted = dict(state)
    for key, value in state.items():
        target = shapes.get(key)
        if _MLP_WEIGHT.search(key) and target is not None and value.shape != target and value.numel() == target.numel():
            fitted[key] = value.reshape(target)
    return fitted


@functools.lru_cache(maxsize=None)
def _timm_shapes(model_name: str) -> dict[str, torch.Size]:
    """Parameter shapes of timm's ``model_name``, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        model = create_dense_model(model_name)
    return {k: v.shape for k, v in model.state_dict().items()}


def _encoder_problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """Mismatched, missing and unexpected keys outside the classifier (``head.fc``), which may
    legitimately differ. ``head.norm`` may be missing (encoder-only checkpoints lack it)."""
    return {
        "mismatched": [
            (k, tuple(v.shape), tuple(expected[k].shape))
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape and not k.startswith("head.fc.")
        ],
        "missing": [k for k in expected if k not in state and not k.startswith("head.")],
        "unexpected": [k for k in state if k not in expected and not k.startswith("head.")],
    }


def _describe_problems(path, model_name: str, state, mismatched, missing, unexpected) -> str:
    looks_like = infer_model_name(state)
    lines = [f"checkpoint {path} does not fit {model_name}; it looks like {looks_like}."]
    if looks_like in MODEL_CONFIGS and looks_like != model_name:
        lines.append(f"Load it with model name {looks_like!r}.")
    if mismatched:
        lines.append(f"{len(mismatched)} shape mismatches (checkpoint vs model):")
        lines += [f"  {k}: {tuple(have)} vs {tuple(want)}" for k, have, want in mismatched[:MAX_LISTED_KEYS]]
        if len(mismatched) > MAX_LISTED_KEYS:
            lines.append(f"  ... and {len(mismatched) - MAX_LISTED_KEYS} more")
    if missing:
        lines.append(f"missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        lines.append(f"unexpected in the checkpoint: {_listing(unexpected)}")
    return "\n".join(lines)


def _listing(keys: list) -> str:
    shown = ", ".join(map(str, keys[:MAX_LISTED_KEYS]))
    more = f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED_KEYS else ""
    return f"[{shown}{more}]"
