"""models.create_backbone: timm features_only ConvNeXt V2 from every checkpoint layout, its
layer-decay groups, and its use in torchvision's FPN and Mask R-CNN."""
from __future__ import annotations

import importlib

import pytest
import timm
import torch
import torchvision
from checkpoint_layouts import LAYOUTS, randomised_model, write_layout
from torch.nn.modules.utils import _pair
from torchvision.extension import _has_ops
from torchvision.models.detection import MaskRCNN, roi_heads
from torchvision.ops import boxes as box_ops
from torchvision.ops import poolers
from torchvision.ops._utils import convert_boxes_to_roi_format

import models
from finetune.features import FeatureExtractor
from models.layer_decay import lr_scale

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backbone_maps_equal_feature_extractor_stages_for_every_layout(layout, images, tmp_path):
    source = randomised_model("convnextv2_atto", num_classes=10 if layout == "official_finetuned" else 0)
    path = write_layout(layout, source, tmp_path)
    backbone = models.create_backbone("convnextv2_atto", path).eval()
    expected = FeatureExtractor("convnextv2_atto", path).stages(images)
    with torch.no_grad():
        maps = backbone(images)
    assert len(maps) == 4
    for index, (feature_map, stage) in enumerate(zip(maps, expected)):
        assert torch.equal(feature_map, stage), f"stage {index} differs from FeatureExtractor.stages ({layout})"
    assert torch.equal(maps[0], source.forward_intermediates(images, intermediates_only=True)[0])


def test_backbone_is_timms_features_only_model(tmp_path):
    backbone = models.create_backbone("convnextv2_atto")
    reference = timm.create_model("convnextv2_atto", features_only=True, pretrained=False)
    assert type(backbone) is type(reference)
    assert backbone.state_dict().keys() == reference.state_dict().keys()
    assert backbone.feature_info.channels() == [40, 80, 160, 320]
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]


def test_out_indices_select_stages_and_are_checked(images, tmp_path):
    path = write_layout("encoder_safetensors", randomised_model("convnextv2_atto"), tmp_path)
    everything = models.create_backbone("convnextv2_atto", path).eval()
    some = models.create_backbone("convnextv2_atto", path, out_indices=(1, 3)).eval()
    assert some.feature_info.channels() == [80, 320] and some.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        all_maps, some_maps = everything(images), some(images)
    assert torch.equal(some_maps[0], all_maps[1]) and torch.equal(some_maps[1], all_maps[3])
    for bad in ((), (0, 4), (2, 1), (1, 1)):
        with pytest.raises(ValueError, match="out_indices must be increasing stage indices in 0..3"):
            models.create_backbone("convnextv2_atto", out_indices=bad)


def test_drop_path_rate_reaches_the_blocks():
    backbone = models.create_backbone("convnextv2_atto", drop_path_rate=0.3)
    last_block = backbone.stages_3.blocks[-1]
    assert last_block.drop_path.drop_prob == pytest.approx(0.3)  # timm: linear in depth, up to the rate


def test_wrong_size_checkpoint_is_refused_with_the_size_it_looks_like(tmp_path):
    path = write_layout("official_fcmae", randomised_model("convnextv2_femto"), tmp_path)
    with pytest.raises(ValueError, match="looks like convnextv2_femto"):
        models.create_backbone("convnextv2_atto", path)


def test_param_groups_apply_the_classification_layer_decay_to_timm_names():
    backbone = models.create_backbone("convnextv2_atto")
    groups = models.backbone_param_groups(backbone, weight_decay=0.05, layer_decay=0.8, lr=1e-3)
    grouped = [param for group in groups for param in group["params"]]
    assert len(grouped) == len(list(backbone.parameters())) == len({id(p) for p in grouped})
    depths = models.MODEL_CONFIGS["convnextv2_atto"][0]
    for group in groups:
        for name in group["param_names"]:
            assert name.startswith(("stem.", "stages.")), name
            assert group["lr_scale"] == pytest.approx(lr_scale(name, depths, "single", 0.8)), name
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert by_name["stem.0.weight"]["lr_scale"] == pytest.approx(0.8 ** 12)  # sum(depths) = 12: smallest
    assert by_name["stem.0.weight"]["weight_decay"] == 0.05 and by_name["stem.0.bias"]["weight_decay"] == 0.0
    assert by_name["stages.3.blocks.1.mlp.grn.weight"]["weight_decay"] == 0.0


def test_param_groups_put_the_rest_of_a_detector_at_full_lr():
    backbone = models.create_backbone("convnextv2_atto")
    detector = torch.nn.ModuleDict({"backbone": models.FeaturePyramidBackbone(backbone, 32),
                                    "head": torch.nn.Linear(32, 5)})
    groups = models.backbone_param_groups(backbone, weight_decay=0.05, layer_decay=0.8, model=detector)
    grouped = [param for group in groups for param in group["params"]]
    assert len(grouped) == len(list(detector.parameters())) == len({id(p) for p in grouped})
    rest = [group for group in groups if group["param_names"][0].startswith("detector.")]
    assert {group["lr_scale"] for group in rest} == {1.0}
    assert sorted(group["weight_decay"] for group in rest) == [0.0, 0.05]  # biases undecayed
    assert torch.optim.AdamW(groups, lr=1e-4)  # a plain torch optimizer takes them


def test_feature_pyramid_network_on_the_backbone(images):
    backbone = models.create_backbone("convnextv2_atto")
    fpn = torchvision.ops.FeaturePyramidNetwork(backbone.feature_info.channels(), 32)
    maps = fpn({str(index): feature_map for index, feature_map in enumerate(backbone(images))})
    assert [tuple(feature_map.shape) for feature_map in maps.values()] == [
        (2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    pyramid = models.FeaturePyramidBackbone(backbone, out_channels=32)
    assert list(pyramid(images)) == ["0", "1", "2", "3", "pool"] and pyramid.out_channels == 32


def _reference_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS in plain PyTorch (torchvision's semantics): indices kept, by decreasing score."""
    ious = box_ops.box_iou(boxes, boxes)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for index in scores.argsort(descending=True).tolist():
        if not suppressed[index]:
            keep.append(index)
            suppressed |= ious[index] > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def synthetic_targets(size: int) -> list[dict]:
    """Two images, each with two boxes and their filled-rectangle masks."""
    targets = []
    for boxes in ([[10, 12, 60, 70], [64, 30, 120, 110]], [[5, 5, 50, 40], [30, 50, 100, 120]]):
        boxes = torch.tensor(boxes, dtype=torch.float32)
        masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks})
    return targets


# torchvision's pure-PyTorch roi_align, undecorated: torchvision wraps it in a lazy torch.compile
# (which replaces a module global on first call), so the fallback calls the plain function.
_pure_roi_align = importlib.import_module("torchvision.ops.roi_align")._roi_align.__wrapped__


def _roi_align_fixed_grid(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """torchvision's roi_align, eagerly, with a 2x2 sampling grid where it would choose one per box (-1)."""
    rois = boxes if isinstance(boxes, torch.Tensor) else convert_boxes_to_roi_format(boxes)
    height, width = _pair(output_size)
    return _pure_roi_align(input, rois, spatial_scale, height, width,
                           2 if sampling_ratio <= 0 else sampling_ratio, aligned)


def use_pure_pytorch_ops(patch: pytest.MonkeyPatch) -> None:
    """Stand-ins for torchvision's compiled nms/roi_align, for machines where they do not load
    (a CUDA torchvision wheel beside a CPU torch). nms has no fallback: the RPN gets a plain PyTorch
    one. roi_align's pure-PyTorch fallback takes minutes for the per-box sampling grid
    (sampling_ratio=-1) of the mask targets: they get a 2x2 grid (the feature pooler's default).
    Only module attributes are patched, never torch's config modules, whose monkeypatch undo
    breaks them under pytest 9.2 (every later torch.compile failed)."""
    patch.setattr(box_ops, "nms", _reference_nms)
    patch.setattr(roi_heads, "roi_align", _roi_align_fixed_grid)
    patch.setattr(poolers, "roi_align", _roi_align_fixed_grid)


def test_the_ops_fallback_leaves_torch_compile_working():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    features = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 16, 16)
    with pytest.MonkeyPatch.context() as patch:
        use_pure_pytorch_ops(patch)
        assert box_ops.nms(boxes, scores, 0.5).tolist() == [0, 2]  # the overlapping box is suppressed
        pooled = poolers.roi_align(features, [torch.tensor([[0.0, 0.0, 15.0, 15.0]])], (2, 2), 1.0, 2, True)
        assert pooled.shape == (1, 2, 2, 2) and torch.all(pooled[0, 1] > pooled[0, 0])
    assert box_ops.nms is not _reference_nms and poolers.roi_align is torchvision.ops.roi_align

    def scaled_sine(x):
        return x.sin() * 2

    inputs = torch.linspace(-3, 3, 7)
    compiled = torch.compile(scaled_sine, backend="eager", fullgraph=True)
    assert torch.equal(compiled(inputs), scaled_sine(inputs))


def test_mask_rcnn_trains_on_the_backbone(monkeypatch):
    if not _has_ops():
        use_pure_pytorch_ops(monkeypatch)  # torchvision's compiled ops do not load here; see there
    torch.manual_seed(0)
    size = 128
    backbone = models.create_backbone("convnextv2_atto", drop_path_rate=0.1)
    detector = MaskRCNN(models.FeaturePyramidBackbone(backbone, out_channels=64), num_classes=3,
                        min_size=size, max_size=size, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                        box_batch_size_per_image=64).train()
    images = [torch.rand(3, size, size) for _ in range(2)]
    losses = detector(images, synthetic_targets(size))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    for stage in ("stem_0", "stages_0", "stages_1", "stages_2", "stages_3"):
        gradient = sum(p.grad.abs().sum() for n, p in backbone.named_parameters() if n.startswith(stage))
        assert gradient > 0, f"no gradient reaches {stage}"
