"""timm model folders (<output_dir>/hub): timm alone loads them through ``local-dir:`` in a fresh
interpreter, with the weights, head, class names and preprocessing of the run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
import pretrain
from engine.eval_transform import timm_eval_config
from engine.hub import save_model_folder
from finetune_helpers import load_finetune_script, make_colour_folder
from image_folders import make_image_folder

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
OUR_PACKAGES = ("models", "engine", "fcmae", "finetune", "pretrain")

# A fresh interpreter: timm loads each folder; the outputs on the given inputs, the data config
# and the refusal of a folder timm cannot build are written to OUTPUTS.
LOADER = """
import importlib.util, json, sys
import torch
# this machine's CUDA torchvision wheel under a CPU torch: define the two schemas its import needs
spec = importlib.util.spec_from_file_location("torchvision_guard", {guard!r})
guard = importlib.util.module_from_spec(spec); spec.loader.exec_module(guard); guard.install()
import timm
from safetensors.torch import load_file, save_file
folders, inputs, outputs, report = {folders!r}, load_file({inputs!r}), {{}}, {{}}
torch.set_num_threads(1)
for name, folder in folders.items():
    try:
        model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    except RuntimeError as error:
        report[name] = {{"refused": str(error)}}
        continue
    with torch.no_grad():
        outputs[name] = model(inputs[name])
    report[name] = {{"data_config": timm.data.resolve_data_config({{}}, model=model),
                    "num_classes": model.num_classes}}
ours = sorted(name for name in sys.modules if name.split(".")[0] in {ours!r})
save_file(outputs, {outputs!r})
print(json.dumps({{"report": report, "our_modules": ours}}))
"""


def load_in_a_fresh_interpreter(folders: dict[str, Path], inputs: dict[str, torch.Tensor], scratch: Path):
    """(outputs, report) of timm loading each folder in a new python process."""
    save_file(inputs, scratch / "inputs.safetensors")
    code = LOADER.format(guard=str(REPO / "models" / "_torchvision_guard.py"),
                         folders={name: str(folder) for name, folder in folders.items()},
                         inputs=str(scratch / "inputs.safetensors"), outputs=str(scratch / "outputs.safetensors"),
                         ours=OUR_PACKAGES)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=scratch,
                            env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(scratch)})
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["our_modules"] == [], "the fresh interpreter imported this package"
    return load_file(scratch / "outputs.safetensors"), loaded["report"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A pretraining run's and a fine-tuning run's hub/, an N-channel and a stride-2 encoder's
    folder; each with its in-process model and an input, then loaded by timm in a fresh process."""
    root = tmp_path_factory.mktemp("hub")
    make_image_folder(root / "data", classes=2, per_class=2)
    pretrain.main(["--model", "convnextv2_atto", "--input_size", "64", "--batch_size", "2", "--epochs", "1",
                   "--warmup_epochs", "0", "--data_path", str(root / "data"), "--output_dir", str(root / "pretrain"),
                   "--num_workers", "0"])
    encoder = models.create_dense_model("convnextv2_atto", num_classes=0)
    encoder.load_state_dict(load_file(root / "pretrain" / "encoder.safetensors"))

    make_colour_folder(root / "labelled" / "train", classes=("red", "green", "blue"), per_class=2, size=40)
    make_colour_folder(root / "labelled" / "val", classes=("red", "green", "blue"), per_class=1, size=40, seed=1)
    load_finetune_script().main([
        "--model", "convnextv2_atto", "--finetune", str(root / "pretrain" / "encoder.safetensors"),
        "--data_path", str(root / "labelled"), "--output_dir", str(root / "finetune"), "--input_size", "32",
        "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0", "--no-model_ema",
        "--no-model_ema_eval", "--mixup", "0", "--cutmix", "0", "--crop_pct", "0.9"])
    classifier = models.load_pretrained("convnextv2_atto", root / "finetune" / "checkpoint-best.pth", num_classes=3)

    channels = models.create_dense_model("convnextv2_atto", in_chans=5, num_classes=0)
    save_model_folder(channels, root / "five_channels", "convnextv2_atto", 64,
                      timm_eval_config(64, mean=[0.5] * 5, std=[0.25] * 5), "fcmae", "five channels", {})
    stride2 = models.create_dense_model("convnextv2_atto", stem_stride=2, num_classes=0)
    save_model_folder(stride2, root / "stride2", "convnextv2_atto", 96, timm_eval_config(96), "fcmae", "stride 2", {})

    in_process = {"pretrain": encoder, "finetune": classifier, "five_channels": channels, "stride2": stride2}
    inputs = {"pretrain": torch.randn(2, 3, 64, 64), "finetune": torch.randn(2, 3, 32, 32),
              "five_channels": torch.randn(2, 5, 64, 64), "stride2": torch.randn(2, 3, 96, 96)}
    paths = {"pretrain": root / "pretrain" / "hub", "finetune": root / "finetune" / "hub",
             "five_channels": root / "five_channels", "stride2": root / "stride2"}
    outputs, report = load_in_a_fresh_interpreter(paths, inputs, root)
    return {"root": root, "paths": paths, "models": in_process, "inputs": inputs, "outputs": outputs,
            "report": report}


@pytest.mark.parametrize("name", ["pretrain", "finetune", "five_channels"])
def test_timm_alone_loads_the_folder_with_the_same_outputs(folders, name):
    model = folders["models"][name].eval()
    with torch.no_grad():
        expected = model(folders["inputs"][name])
    torch.testing.assert_close(folders["outputs"][name], expected, rtol=1e-5, atol=1e-6)


def test_the_encoder_folder_carries_the_run_preprocessing_and_a_model_card(folders):
    config = json.loads((folders["paths"]["pretrain"] / "config.json").read_text())
    assert config["architecture"] == "convnextv2_atto" and config["num_classes"] == 0
    assert config["num_features"] == 320 and config["model_args"]["patch_size"] == 4
    assert config["pretrained_cfg"]["tag"] == "fcmae" and config["pretrained_cfg"]["license"] is None
    assert folders["report"]["pretrain"]["data_config"] == {
        "input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center"}
    assert sorted(path.name for path in folders["paths"]["pretrain"].iterdir()) == [
        "README.md", "config.json", "model.safetensors"]  # safetensors only: nothing pickled
    card = (folders["paths"]["pretrain"] / "README.md").read_text()
    epochs = [json.loads(line) for line in (folders["root"] / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert f"**Final loss:** {epochs[-1]['loss']:.4f} (epoch 1" in card and "1 of 1 epochs" in card
    assert f"timm.create_model(\"local-dir:{folders['paths']['pretrain']}\", pretrained=True)" in card


def test_the_classifier_folder_has_the_class_names_and_the_evaluation_transform(folders):
    config = json.loads((folders["paths"]["finetune"] / "config.json").read_text())
    assert config["num_classes"] == 3 and config["label_names"] == ["blue", "green", "red"]  # sorted folders
    assert config["pretrained_cfg"]["tag"] == "fcmae_ft"
    report = folders["report"]["finetune"]
    assert report["num_classes"] == 3
    assert report["data_config"] == {"input_size": [3, 32, 32], "interpolation": "bicubic",
                                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                     "crop_pct": 0.9, "crop_mode": "center"}  # --crop_pct 0.9
    assert "**Validation:** top-1" in (folders["paths"]["finetune"] / "README.md").read_text()


def test_channels_are_carried_in_model_args_and_a_stride2_stem_is_refused_rather_than_misbuilt(folders):
    assert json.loads((folders["paths"]["five_channels"] / "config.json").read_text())["model_args"]["in_chans"] == 5
    assert folders["report"]["five_channels"]["data_config"]["input_size"] == [5, 64, 64]
    assert json.loads((folders["paths"]["stride2"] / "config.json").read_text())["model_args"]["patch_size"] == 2
    assert "stages.0.downsample" in folders["report"]["stride2"]["refused"]
    reloaded = models.load_pretrained("convnextv2_atto", folders["paths"]["stride2"] / "model.safetensors")
    stride2 = folders["models"]["stride2"].eval()
    with torch.no_grad():
        assert torch.equal(reloaded.eval().forward_features(folders["inputs"]["stride2"]),
                           stride2.forward_features(folders["inputs"]["stride2"]))
