"""models.layer_decay: layer ids and lr scales of the official `single` and `group` schemes."""
import pytest
import torch

import models
from engine.optim import build_adamw
from engine.schedule import build_lr_scheduler
from models.layer_decay import layer_id, lr_scale, num_layers, param_groups_layer_decay, skips_weight_decay

ATTO_DEPTHS = models.MODEL_CONFIGS["convnextv2_atto"][0]  # (2, 2, 6, 2): num_layers 12
BASE_DEPTHS = models.MODEL_CONFIGS["convnextv2_base"][0]  # (3, 3, 27, 3)


def meta_model(name):
    with torch.device("meta"):
        return models.create_dense_model(name)


# single, atto: stem/downsample before stage i -> sum(depths[:i]) + 1; block j of stage i ->
# sum(depths[:i]) + j + 1; head -> sum(depths) + 1 = 13. Written out by hand, not by the formula.
ATTO_SINGLE_IDS = {
    "stem.0.weight": 1, "stem.1.bias": 1,
    "stages.0.blocks.0.conv_dw.weight": 1, "stages.0.blocks.1.mlp.fc2.bias": 2,
    "stages.1.downsample.0.weight": 3, "stages.1.downsample.1.bias": 3,
    "stages.1.blocks.0.norm.weight": 3, "stages.1.blocks.1.mlp.grn.weight": 4,
    "stages.2.downsample.1.weight": 5, "stages.2.blocks.0.mlp.fc1.weight": 5, "stages.2.blocks.5.conv_dw.bias": 10,
    "stages.3.downsample.1.weight": 11, "stages.3.blocks.0.mlp.fc1.weight": 11, "stages.3.blocks.1.mlp.grn.bias": 12,
    "head.norm.weight": 13, "head.fc.weight": 13, "head.fc.bias": 13,
}

# group, base: stem 0; downsample before stage 1, 2, 3 -> 2, 3, 12; stage 0/1 blocks -> 1/2;
# stage 2 block j -> 3 + j // 3; stage 3 blocks -> 12; head -> 13.
BASE_GROUP_IDS = {
    "stem.0.weight": 0, "stem.1.weight": 0,
    "stages.0.blocks.0.conv_dw.weight": 1, "stages.0.blocks.2.mlp.fc2.weight": 1,
    "stages.1.downsample.1.weight": 2, "stages.1.blocks.2.norm.bias": 2,
    "stages.2.downsample.0.weight": 3, "stages.2.blocks.0.mlp.fc1.weight": 3, "stages.2.blocks.2.conv_dw.weight": 3,
    "stages.2.blocks.3.conv_dw.weight": 4, "stages.2.blocks.14.mlp.grn.weight": 7,
    "stages.2.blocks.24.norm.weight": 11, "stages.2.blocks.26.mlp.fc2.bias": 11,
    "stages.3.downsample.1.weight": 12, "stages.3.blocks.0.conv_dw.weight": 12, "stages.3.blocks.2.mlp.fc2.weight": 12,
    "head.norm.bias": 13, "head.fc.weight": 13,
}


def test_num_layers_is_sum_of_depths_for_single_and_twelve_for_group():
    assert num_layers(ATTO_DEPTHS, "single") == 12
    assert num_layers(BASE_DEPTHS, "single") == 36
    assert num_layers(BASE_DEPTHS, "group") == 12


def test_single_layer_ids_on_atto_parameter_names():
    names = {name for name, _ in meta_model("convnextv2_atto").named_parameters()}
    assert set(ATTO_SINGLE_IDS) <= names
    for name, expected in ATTO_SINGLE_IDS.items():
        assert layer_id(name, ATTO_DEPTHS, "single") == expected, name
    assert {layer_id(name, ATTO_DEPTHS, "single") for name in names} == set(range(1, 14))


def test_group_layer_ids_on_base_parameter_names():
    names = {name for name, _ in meta_model("convnextv2_base").named_parameters()}
    assert set(BASE_GROUP_IDS) <= names
    for name, expected in BASE_GROUP_IDS.items():
        assert layer_id(name, BASE_DEPTHS, "group") == expected, name
    assert {layer_id(name, BASE_DEPTHS, "group") for name in names} == set(range(0, 14))


@pytest.mark.parametrize("model_name,decay_type,decay,expected_ids", [
    ("convnextv2_atto", "single", 0.9, ATTO_SINGLE_IDS),
    ("convnextv2_base", "group", 0.6, BASE_GROUP_IDS),
])
def test_param_group_lr_scale_is_decay_to_the_distance_from_the_head(model_name, decay_type, decay, expected_ids):
    depths = models.MODEL_CONFIGS[model_name][0]
    groups = param_groups_layer_decay(meta_model(model_name), depths, 0.05, decay, decay_type)
    scale_of = {name: group["lr_scale"] for group in groups for name in group["param_names"]}
    for name, layer in expected_ids.items():
        assert scale_of[name] == pytest.approx(decay ** (13 - layer)), name  # num_layers + 1 = 13 for both
    assert scale_of["head.fc.weight"] == 1.0
    assert scale_of["stem.0.weight"] == pytest.approx(decay ** (12 if decay_type == "single" else 13))
    assert lr_scale("stages.2.blocks.14.conv_dw.weight", BASE_DEPTHS, "group", 0.6) == pytest.approx(0.6 ** 6)


def test_every_trainable_parameter_is_in_exactly_one_group():
    model = models.create_dense_model("convnextv2_atto", num_classes=5)
    model.stem.requires_grad_(False)
    groups = param_groups_layer_decay(model, ATTO_DEPTHS, 0.05, 0.9, "single")
    grouped = [id(param) for group in groups for param in group["params"]]
    trainable = [id(param) for param in model.parameters() if param.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))


def test_no_weight_decay_on_1d_tensors_biases_and_grn():
    groups = param_groups_layer_decay(meta_model("convnextv2_atto"), ATTO_DEPTHS, 0.3, 0.9, "single")
    decay_of = {name: group["weight_decay"] for group in groups for name in group["param_names"]}
    assert decay_of["stages.1.blocks.0.mlp.fc1.weight"] == 0.3
    assert decay_of["stages.1.blocks.0.conv_dw.weight"] == 0.3
    assert decay_of["head.fc.weight"] == 0.3
    for name in ("stages.1.blocks.0.mlp.fc1.bias", "stages.1.blocks.0.norm.weight", "head.norm.weight",
                 "stages.1.blocks.0.mlp.grn.weight", "stages.1.blocks.0.mlp.grn.bias"):
        assert decay_of[name] == 0.0, name
    # official checkpoints shape GRN gamma (1, 1, 1, C): still no decay
    assert skips_weight_decay("stages.0.blocks.0.grn.gamma", torch.zeros(1, 1, 1, 8))


def test_scheduler_sets_each_group_lr_to_scheduled_lr_times_its_scale():
    model = models.create_dense_model("convnextv2_atto", num_classes=3)
    optimizer = build_adamw(model, 1e-3, 0.05, (0.9, 0.999),
                            param_group_fn=lambda m: param_groups_layer_decay(m, ATTO_DEPTHS, 0.05, 0.9, "single"))
    scheduler = build_lr_scheduler(optimizer, epochs=10, warmup_epochs=0, updates_per_epoch=4)
    scheduler.step_update(20)  # halfway through the cosine: lr = 0.5e-3
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.5e-3 * 0.9 ** (13 - group["layer_id"]), rel=1e-6)


def test_group_scheme_warns_for_depths_it_was_not_designed_for():
    with pytest.warns(UserWarning, match="use 'single'"):
        param_groups_layer_decay(meta_model("convnextv2_atto"), ATTO_DEPTHS, 0.05, 0.6, "group")


def test_unknown_decay_type_names_the_flag():
    with pytest.raises(ValueError, match="--layer_decay_type"):
        layer_id("stem.0.weight", ATTO_DEPTHS, "per_block")
