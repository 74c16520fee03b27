"""Dense ConvNeXt V2 sizes: timm names, published parameter counts."""
import pytest
import torch

from models import MODEL_CONFIGS, SparseConvNeXtV2, check_model_name, create_dense_model

# published parameter counts in millions (docs/RECIPES.md), with a 1000-class head
PUBLISHED_PARAMS_M = {
    "convnextv2_atto": 3.7, "convnextv2_femto": 5.2, "convnextv2_pico": 9.1, "convnextv2_nano": 15.6,
    "convnextv2_tiny": 28.6, "convnextv2_base": 89, "convnextv2_large": 198, "convnextv2_huge": 660,
}


@pytest.mark.parametrize("model_name", list(MODEL_CONFIGS))
def test_parameter_count_matches_published(model_name):
    with torch.device("meta"):
        model = create_dense_model(model_name)
    count_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert count_m == pytest.approx(PUBLISHED_PARAMS_M[model_name], rel=0.01), f"{model_name}: {count_m:.2f}M"


@pytest.mark.parametrize("model_name", list(MODEL_CONFIGS))
def test_depths_and_dims_match_config(model_name):
    depths, dims = MODEL_CONFIGS[model_name]
    with torch.device("meta"):
        model = create_dense_model(model_name)
    assert tuple(len(stage.blocks) for stage in model.stages) == depths
    assert tuple(stage.blocks[0].conv_dw.weight.shape[0] for stage in model.stages) == dims


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="convnextv2_atto.*convnextv2_huge"):
        check_model_name("convnextv2_gigantic")


@pytest.mark.parametrize("model_name", ["convnextv2_atto", "convnextv2_tiny"])
def test_encoder_state_dict_loads_into_timm_with_only_head_norm_missing(model_name):
    import timm

    with torch.device("meta"):
        encoder = SparseConvNeXtV2(model_name)
        dense = timm.create_model(model_name, num_classes=0)
    result = dense.load_state_dict(encoder.state_dict(), strict=False, assign=True)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["head.norm.bias", "head.norm.weight"]
