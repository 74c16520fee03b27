"""Continued pretraining: a fresh FCMAE's weights from an earlier encoder (and decoder).

``init_from(model, path)`` fills a newly built ``FCMAE`` from any file ``models.load_pretrained``
reads: the official FCMAE files (``convnextv2_<size>_1k_224_fcmae.pt``), timm's
``convnextv2_*.fcmae`` safetensors, our ``encoder.safetensors``, a pretraining checkpoint (with
its decoder) and the official MinkowskiEngine checkpoints. It is weights only: optimizer state,
lr schedule and epoch count are the new run's own.

* Encoder: every tensor is required (another model size is a ValueError listing the
  mismatches). A stem of another stride or channel count is adapted to the model's, not
  refused (``models.fit_stem``: timm's ``adapt_input_conv`` for channels; for the kernel,
  4x4 -> 2x2 sums each 2x2 block of taps, so the stride-2 stem sees an image as the stride-4
  stem saw it at twice the size).
* Decoder: the mask token and each decoder part (``proj``, ``decoder``, ``pred``) are taken
  from a file that has them when every tensor of the part has the model's shape; otherwise the
  part keeps its fresh initialisation (e.g. ``pred``, whose width is patch x patch x channels,
  after a change of stem stride or channels).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from models import convert_to_timm, fit_stem, read_checkpoint
from models.checkpoint import detect_layout, encoder_mismatch, encoder_part, official_dense_to_timm, unwrap_state

from .model import FCMAE

DECODER_PARTS = ("proj", "mask_token", "decoder", "pred")


@dataclass
class InitReport:
    """What ``init_from`` did: one entry per loaded, adapted and freshly initialised part."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as log lines."""
        lines = [f"initialised from {self.source} ({self.layout} layout); optimizer, lr schedule and epoch count "
                 "start fresh"]
        lines += [f"  loaded: {item}" for item in self.loaded]
        lines += [f"  adapted: {item}" for item in self.adapted]
        lines += [f"  initialised fresh: {item}" for item in self.fresh]
        return lines


def init_from(model: FCMAE, path: str | os.PathLike) -> InitReport:
    """Load the encoder (adapted to the model's stem) and the decoder parts that fit from ``path``
    into ``model`` (module docstring). ValueError naming the file for an unreadable file or an
    encoder of another size; FileNotFoundError for a missing one."""
    checkpoint = read_checkpoint(path)
    encoder = model.encoder
    state = unwrap_state(checkpoint)
    report = InitReport(str(path), detect_layout(encoder_part(state)))

    encoder_state = {key: value for key, value in convert_to_timm(checkpoint, encoder.model_name).items()
                     if not key.startswith("head.")}
    encoder_state, report.adapted = fit_stem(encoder_state, encoder.stem_stride, encoder.in_chans)
    problems = encoder_mismatch(path, encoder.model_name, encoder_state, encoder.state_dict())
    if problems:
        raise ValueError(problems)
    encoder.load_state_dict(encoder_state)
    report.loaded.append(f"encoder ({len(encoder_state)} tensors)")

    decoder_state = {key: value for key, value in state.items() if key.split(".", 1)[0] in DECODER_PARTS}
    if report.layout.startswith("official"):
        decoder_state = official_dense_to_timm(decoder_state)  # the official decoder's blocks are dense ones
    expected = model.state_dict()
    loadable = {}
    for part in DECODER_PARTS:
        wanted = {key: value.shape for key, value in expected.items() if key.split(".", 1)[0] == part}
        found = {key: value for key, value in decoder_state.items() if key.split(".", 1)[0] == part}
        mismatch = _part_mismatch(found, wanted)
        if mismatch is None:
            loadable.update(found)
            report.loaded.append(part)
        else:
            report.fresh.append(f"{part} ({mismatch})")
    model.load_state_dict(loadable, strict=False)
    return report


def _part_mismatch(found: dict[str, torch.Tensor], wanted: dict[str, torch.Size]) -> str | None:
    """Why the file's tensors ``found`` of a part cannot fill the model's (``wanted`` shapes), or None."""
    if not found:
        return "not in the file"
    if found.keys() != wanted.keys():
        return f"the file's has {len(found)} tensors, the model's {len(wanted)} (another decoder depth?)"
    for key, shape in wanted.items():
        if found[key].shape != shape:
            return f"{key}: file {tuple(found[key].shape)}, model {tuple(shape)}"
    return None
