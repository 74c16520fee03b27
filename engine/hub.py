"""A timm model folder: what ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads and
``huggingface_hub.upload_folder`` publishes unchanged (then ``"hf-hub:<org>/<name>"`` loads it).

    <folder>/config.json        architecture, num_classes, num_features, model_args (stem patch
                                size, channels), label_names, pretrained_cfg (input size, mean/std,
                                interpolation, crop_pct, crop_mode, tag): timm's own writer
    <folder>/model.safetensors  the weights with timm's names (no pickle)
    <folder>/README.md          the model card

``save_model_folder`` writes the folder next to itself, then swaps it in, so a reader never sees
half of one. The preprocessing in ``pretrained_cfg`` is what ``timm.data.resolve_data_config`` +
``create_transform`` turn into the evaluation transform.

timm builds only the paper's stride-4 stem: for ``patch_size=2`` it adds a stage-0 downsampling
that our stride-2 model does not have (``models.convnextv2``). The folder of a stride-2 model
records ``patch_size: 2`` all the same, so ``local-dir:`` refuses it (missing
``stages.0.downsample.*``) instead of loading something else; ``models.load_pretrained(name,
"<folder>/model.safetensors")`` loads it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import models  # noqa: F401  (torchvision guard before timm)
import torch.nn as nn
from timm.models import save_for_hf

from models.convnextv2 import TIMM_STAGE0_DOWNSAMPLING_STEM, stem_geometry

HUB_FOLDER = "hub"
# timm's default configuration of convnextv2_* describes Meta's published weights; a folder of
# ours describes other weights, so their source and licence are not carried over.
NOT_OURS = {"license": None, "origin_url": None}


def save_model_folder(model: nn.Module, folder: str | os.PathLike, model_name: str, input_size: int,
                      preprocessing: dict, tag: str, title: str, facts: dict,
                      label_names: Optional[Sequence[str]] = None) -> Path:
    """Write ``model`` (a timm ConvNeXt V2 ``model_name``, any head) as a timm model folder.

    ``preprocessing``: interpolation, crop_pct, crop_mode, mean, std
    (``engine.eval_transform.timm_eval_config``); ``tag``: the pretrained tag (e.g. "fcmae");
    ``title`` and ``facts`` (name -> value): the model card's heading and "Model details" list;
    ``label_names``: class names, one per output (None: no names)."""
    folder = Path(folder)
    in_chans = stem_geometry(model.stem[0].weight)[1]
    data_config = {"input_size": (in_chans, input_size, input_size), **preprocessing}
    model_config = {"pretrained_cfg": {**NOT_OURS, "tag": tag, "crop_mode": preprocessing["crop_mode"]}}
    if label_names is not None:
        model_config["label_names"] = list(label_names)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        save_for_hf(model, str(staging), model_config=model_config, safe_serialization=True, data_config=data_config)
        (staging / "README.md").write_text(model_card(model, folder, model_name, title, facts))
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def replace_folder(new: Path, folder: Path) -> None:
    """Put ``new`` in place of ``folder``: the old one is renamed away first and then removed."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def model_card(model: nn.Module, folder: Path, model_name: str, title: str, facts: dict) -> str:
    """README.md: the Hub's metadata header, ``facts``, how to load the folder, the licence note."""
    details = "".join(f"- **{name}:** {value}\n" for name, value in facts.items())
    return ("---\ntags:\n- image-classification\n- timm\n- convnextv2\n- fcmae\nlibrary_name: timm\n---\n"
            f"# {title}\n\n## Model details\n{details}\n## How to load\n{loading_section(model, folder, model_name)}\n"
            "## License\nNot set. Add a `license:` line to the header above before publishing: the terms depend on "
            "the data these weights were trained on and on any weights training started from.\n")


def loading_section(model: nn.Module, folder: Path, model_name: str) -> str:
    """The model card's "How to load" text."""
    stem_stride = stem_geometry(model.stem[0].weight)[0]
    if stem_stride == TIMM_STAGE0_DOWNSAMPLING_STEM:
        return ("This model has a stride-2 stem without timm's stage-0 downsampling (total stride 16), which "
                "timm cannot build, so `timm.create_model(\"local-dir:...\")` refuses this folder. Load it with "
                "the fcmae-convnextv2 package:\n\n```python\nimport models\n"
                f"model = models.load_pretrained(\"{model_name}\", \"{folder}/model.safetensors\")\n```\n")
    return ("```python\nimport timm\n"
            f"model = timm.create_model(\"local-dir:{folder}\", pretrained=True)  # this folder\n"
            "model = timm.create_model(\"hf-hub:<org>/<name>\", pretrained=True)  # once published\n"
            "config = timm.data.resolve_data_config({}, model=model)\n"
            "transform = timm.data.create_transform(**config)  # the evaluation preprocessing\n```\n\n"
            "Publish this folder unchanged with `huggingface_hub.upload_folder(repo_id=\"<org>/<name>\", "
            f"folder_path=\"{folder}\")` (after `hf auth login`).\n")
