"""Fine-tuning building blocks: model/head, EMA, data checks, transforms, Mixup, evaluation."""
import argparse

import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fcmae
import models
from engine.class_folders import check_same_classes
from engine.config import ConfigError, parse_args, validate
from engine.data import UNREADABLE_TARGET
from engine.eval_transform import build_eval_transform
from engine.stepper import GradientStepper, build_model_ema
from finetune.data import build_datasets
from finetune.evaluate import evaluate
from finetune.mixup import build_mixup, build_train_criterion
from finetune.model import HEAD_INIT_STD, build_finetune_model
from finetune_helpers import REPO_ROOT, load_finetune_script, make_colour_folder
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


# ---------------------------------------------------------------- model and head

def test_finetune_model_keeps_checkpoint_trunk_and_gets_a_new_small_head(tmp_path):
    source = models.create_dense_model("convnextv2_atto", num_classes=8)
    torch.save({"model": source.state_dict()}, tmp_path / "finetuned.pth")
    model = build_finetune_model("convnextv2_atto", 8, tmp_path / "finetuned.pth", drop_path=0.1)
    state, source_state = model.state_dict(), source.state_dict()
    for name in ("stem.0.weight", "stages.2.blocks.3.mlp.fc1.weight", "head.norm.weight"):
        assert torch.equal(state[name], source_state[name]), name
    # same-sized head in the checkpoint, but fine-tuning re-initialises it (official recipe)
    assert not torch.equal(state["head.fc.weight"], source_state["head.fc.weight"])
    assert 0.7 * HEAD_INIT_STD < state["head.fc.weight"].std() < 1.3 * HEAD_INIT_STD
    assert torch.count_nonzero(state["head.fc.bias"]) == 0
    assert model.stages[1].blocks[0].drop_path.drop_prob == pytest.approx(0.1 * 2 / 11)  # timm's linear ramp


def test_finetune_from_an_fcmae_training_checkpoint_takes_the_encoder_and_drops_the_decoder(tmp_path):
    fcmae_model = fcmae.build_fcmae("convnextv2_atto")
    torch.save({"model": fcmae_model.state_dict(), "epoch": 1}, tmp_path / "checkpoint-1.pth")
    model = build_finetune_model("convnextv2_atto", 3, tmp_path / "checkpoint-1.pth")
    encoder_state = fcmae_model.encoder.state_dict()
    state = model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in encoder_state.items())
    assert model.head.fc.out_features == 3


def test_finetune_from_checkpoint_of_another_size_names_that_size(tmp_path):
    encoder = models.create_dense_model("convnextv2_atto", num_classes=0)
    torch.save(encoder.state_dict(), tmp_path / "atto.pth")
    with pytest.raises(ValueError, match="looks like convnextv2_atto"):
        build_finetune_model("convnextv2_femto", 4, tmp_path / "atto.pth")


# ---------------------------------------------------------------- EMA

def test_ema_weights_equal_the_closed_form_after_k_updates():
    model = nn.Linear(3, 2)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    ema = build_model_ema(model, decay=0.9)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # jump to w1 = w0 + 1 and stay there
    for _ in range(5):
        ema.update(model)
    for name, value in ema.module.state_dict().items():
        expected = 0.9**5 * start[name] + (1 - 0.9**5) * (start[name] + 1.0)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_ema_stepper_updates_the_average_once_per_optimizer_update():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = build_model_ema(model, decay=0.5)
    stepper = GradientStepper(model, optimizer, update_freq=2, ema=ema)
    expected = model.weight.detach().clone()
    for iteration in range(6):  # 6 micro-batches, 3 optimizer updates
        stepper.backward(model(torch.randn(8, 4)).pow(2).mean())
        stepped = stepper.ends_update(iteration)
        assert stepped == (iteration % 2 == 1)
        if stepped:
            stepper.step()
            expected = 0.5 * expected + 0.5 * model.weight.detach()
    torch.testing.assert_close(ema.module.weight, expected, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- data

def test_class_mismatch_error_lists_the_classes_found_in_one_split_only(tmp_path):
    make_colour_folder(tmp_path / "data" / "train", classes=("red", "green", "blue"), per_class=1, size=8)
    make_colour_folder(tmp_path / "data" / "val", classes=("red", "green", "yellow"), per_class=1, size=8)
    args = argparse.Namespace(data_path=str(tmp_path / "data"), eval_data_path=None)
    with pytest.raises(ConfigError, match=r"only in train: \[blue\]; only in val: \[yellow\]"):
        build_datasets(args, build_eval_transform(32), build_eval_transform(32))


def test_same_classes_pass_the_check():
    check_same_classes(["a", "b"], ["a", "b"])


def test_missing_validation_folder_names_eval_data_path(tmp_path):
    make_colour_folder(tmp_path / "only_classes", per_class=1, size=8)
    args = argparse.Namespace(data_path=str(tmp_path / "only_classes"), eval_data_path=None)
    with pytest.raises(ConfigError, match="--eval_data_path"):
        build_datasets(args, build_eval_transform(32), build_eval_transform(32))


def test_nb_classes_smaller_than_the_data_is_an_error():
    script = load_finetune_script()
    assert script.resolve_num_classes(argparse.Namespace(nb_classes=None), ["a", "b", "c"]) == 3
    assert script.resolve_num_classes(argparse.Namespace(nb_classes=10), ["a", "b", "c"]) == 10
    with pytest.raises(ConfigError, match="--nb_classes 2: the data has 3 classes"):
        script.resolve_num_classes(argparse.Namespace(nb_classes=2), ["a", "b", "c"])


def test_demo_starts_from_the_pretraining_demo_encoder_when_present(tmp_path, monkeypatch):
    script = load_finetune_script()
    monkeypatch.chdir(tmp_path)
    assert "--finetune" not in script.demo_arguments()
    (tmp_path / "output" / "pretrain_demo").mkdir(parents=True)
    (tmp_path / "output" / "pretrain_demo" / "encoder.safetensors").write_bytes(b"x")
    argv = script.demo_arguments()
    assert argv[argv.index("--finetune") + 1] == "output/pretrain_demo/encoder.safetensors"


# ---------------------------------------------------------------- transforms and Mixup

def test_eval_transform_center_crops_below_384_and_resizes_plainly_from_384():
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 200))  # a blue strip on the far left
    small = build_eval_transform(64)(image)
    assert small.shape == (3, 64, 64)
    # short side -> int(64 / 0.875) = 73, width 109; the 64-px center crop drops the left 22 px (~10 px of blue)
    assert small[2, :, 0].mean() < 0  # red (normalised blue channel negative): the strip was cropped away
    large = build_eval_transform(384)(image)
    assert large.shape == (3, 384, 384)
    assert large[2, :, 0].mean() > 1  # plain resize: the strip is still there
    explicit = build_eval_transform(384, crop_pct=0.875)(image)
    assert explicit[2, :, 0].mean() < 0


def test_mixup_gives_soft_targets_and_the_matching_loss():
    mixup = build_mixup(num_classes=4, mixup=0.8, cutmix=1.0, smoothing=0.1)
    images, targets = mixup(torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert targets.shape == (6, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert targets.min() >= 0.1 / 4 - 1e-6  # smoothing spreads at least 0.1/4 on every class
    assert isinstance(build_train_criterion(mixup, 0.1), SoftTargetCrossEntropy)
    assert build_mixup(num_classes=4, mixup=0.0, cutmix=0.0) is None
    assert isinstance(build_train_criterion(None, 0.1), LabelSmoothingCrossEntropy)
    assert isinstance(build_train_criterion(None, 0.0), nn.CrossEntropyLoss)


# ---------------------------------------------------------------- evaluation

class FixedLogits(nn.Module):
    """Logits stored per sample index (the input is the index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, index):
        return self.logits[index]


def test_top1_top5_and_loss_on_known_logits():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0],             # label 0: first choice
                           [0, 5.0, 1, 0.5, 0.4, 0.3],        # label 2: second choice
                           [1.0, 0.2, 0.8, 0.7, 0.6, 5],      # label 1: last (6th) choice
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])   # label 4: second choice
    labels = torch.tensor([0, 2, 1, 4])
    loader = DataLoader(TensorDataset(torch.arange(4), labels), batch_size=3)
    results = evaluate(FixedLogits(logits), loader)
    assert results["acc1"] == pytest.approx(25.0)
    assert results["acc5"] == pytest.approx(75.0)
    assert results["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item())
    assert results["count"] == 4


def test_unreadable_images_are_left_out_of_every_count():
    logits = torch.tensor([[5.0, 0], [5.0, 0], [0, 5.0], [0, 5.0], [5.0, 0], [0, 5.0]])
    labels = torch.tensor([0, UNREADABLE_TARGET, UNREADABLE_TARGET, UNREADABLE_TARGET, 1, 1])
    results = evaluate(FixedLogits(logits), DataLoader(TensorDataset(torch.arange(6), labels), batch_size=2))
    assert results["count"] == 3  # batches: one readable of two, none, both
    assert results["acc1"] == pytest.approx(200 / 3)
    readable = torch.tensor([0, 4, 5])
    assert results["loss"] == pytest.approx(nn.functional.cross_entropy(logits[readable], labels[readable]).item())


def test_distributed_shards_count_every_image_once_despite_padding():
    torch.manual_seed(0)
    count, world_size = 7, 3  # DistributedSampler pads 7 -> 9, repeating images 0 and 1
    logits, labels = torch.randn(count, 5), torch.randint(0, 5, (count,))
    dataset = TensorDataset(torch.arange(count), labels)
    full = evaluate(FixedLogits(logits), DataLoader(dataset, batch_size=2))
    shards = [evaluate(FixedLogits(logits), DataLoader(dataset, batch_size=2, sampler=DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=False))) for rank in range(world_size)]
    assert sum(shard["count"] for shard in shards) == count
    correct = sum(shard["acc1"] * shard["count"] / 100 for shard in shards)
    assert correct == pytest.approx(full["acc1"] * count / 100)
    loss = sum(shard["loss"] * shard["count"] for shard in shards) / count
    assert loss == pytest.approx(full["loss"])


def test_shuffled_distributed_sampler_is_refused_for_evaluation():
    dataset = TensorDataset(torch.arange(4), torch.zeros(4, dtype=torch.long))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        evaluate(FixedLogits(torch.zeros(4, 2)), DataLoader(dataset, sampler=sampler))


# ---------------------------------------------------------------- recipes

OFFICIAL_RECIPES = {  # docs/RECIPES.md: blr, epochs, warmup, decay type, layer decay, wd, drop path, mixup, cutmix, smoothing
    "atto": (2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.0, 0.0, 0.2),
    "tiny": (8e-4, 300, 40, "single", 0.9, 0.05, 0.2, 0.8, 1.0, 0.1),
    "base": (6.25e-4, 100, 20, "group", 0.6, 0.05, 0.1, 0.8, 1.0, 0.1),
}


@pytest.mark.parametrize("size", list(OFFICIAL_RECIPES))
def test_config_files_hold_the_official_recipes(size):
    script = load_finetune_script()
    args = parse_args(script.build_parser(), ["--config", str(REPO_ROOT / "configs" / f"finetune_{size}.yaml")])
    recipe = (args.blr, args.epochs, args.warmup_epochs, args.layer_decay_type, args.layer_decay, args.weight_decay,
              args.drop_path, args.mixup, args.cutmix, args.smoothing)
    assert recipe == OFFICIAL_RECIPES[size]
    assert args.batch_size * args.update_freq * 8 == 1024  # effective batch on 8 GPUs
    assert (args.aa, args.reprob, args.model_ema, args.model_ema_decay, args.model_ema_eval) == (
        "rand-m9-mstd0.5-inc1", 0.25, True, 0.9999, True)


@pytest.mark.parametrize("size", ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge", "demo"])
def test_every_config_file_is_valid_for_its_model(size):
    script = load_finetune_script()
    args = parse_args(script.build_parser(), ["--config", str(REPO_ROOT / "configs" / f"finetune_{size}.yaml")])
    validate(args, script.TRAINING_CHECKS + script.FINETUNE_CHECKS)
    assert args.model == f"convnextv2_{'atto' if size == 'demo' else size}"
    assert args.layer_decay_type == ("group" if models.MODEL_CONFIGS[args.model][0] == (3, 3, 27, 3) else "single")
