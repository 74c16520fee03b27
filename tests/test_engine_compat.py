"""engine.compat: TF32 switches read and set through one API, the total-norm fallback, and the
supported-version check every CLI runs first."""
import importlib
import re

import pytest
import torch

import pretrain
from engine import compat
from engine.compat import TF32, get_tf32, set_tf32, total_norm
from engine.config import resolve_hardware_defaults
from engine.flops import matmul_precision
from finetune_helpers import REPO_ROOT, load_finetune_script


def test_cuda_hardware_defaults_turn_tf32_on_and_mfu_reads_it(restore_tf32):
    """The --amp none path on CUDA: the resolver sets TF32, the MFU precision reads it back."""
    args = pretrain.build_parser().parse_args(["--amp", "none"])
    resolve_hardware_defaults(args, "cuda", 1, cpus=2, bf16_supported=True)
    assert get_tf32() == TF32(matmul=True, conv=True)
    assert matmul_precision("none") == "tf32" and matmul_precision("bf16") == "bf16"
    set_tf32(matmul=False, conv=True)
    assert matmul_precision("none") == "fp32"


def legacy_matmul_flag(enabled):  # what older libraries do
    torch.backends.cuda.matmul.allow_tf32 = enabled


def matmul_precision_setting(enabled):  # what Lightning and many scripts do
    torch.set_float32_matmul_precision("high" if enabled else "highest")


@pytest.mark.filterwarnings("ignore:Please use the new API settings")  # torch >= 2.9 says so to the other library
@pytest.mark.parametrize("switch", [legacy_matmul_flag, matmul_precision_setting])
def test_tf32_read_follows_whichever_switch_another_library_used(switch, restore_tf32):
    for ours in (True, False):
        set_tf32(matmul=ours, conv=True)
        for theirs in (True, False):  # ends on torch's default, False, so no mix of switches is left behind
            switch(theirs)
            assert get_tf32().matmul == theirs, f"{switch.__name__}({theirs}) after set_tf32({ours})"
            assert matmul_precision("none") == ("tf32" if theirs else "fp32")
            set_tf32(matmul=not theirs, conv=True)  # and ours wins again after theirs
            assert get_tf32().matmul == (not theirs)


@pytest.mark.skipif(not compat.FP32_PRECISION_API, reason="this torch has only the allow_tf32 flags")
def test_tf32_read_follows_the_generic_fp32_precision_setting(restore_tf32):
    set_tf32(matmul=False, conv=False)
    torch.backends.fp32_precision = "tf32"  # what a library on the new API may set instead of ours
    try:
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "none"  # inherit it
        assert get_tf32() == TF32(True, True) and matmul_precision("none") == "tf32"
    finally:
        torch.backends.fp32_precision = "none"


@pytest.mark.parametrize("matmul, conv", [(True, False), (False, True), (True, True), (False, False)])
def test_allow_tf32_fallback_sets_what_the_newer_api_reads(matmul, conv, monkeypatch):
    """The branch for a torch without fp32_precision, run here on the flags it would set."""
    has_fp32_precision = compat.FP32_PRECISION_API
    saved = get_tf32()
    monkeypatch.setattr(compat, "FP32_PRECISION_API", False)
    try:
        set_tf32(matmul, conv)
        assert get_tf32() == TF32(matmul, conv)
        with monkeypatch.context() as this_torch:
            this_torch.setattr(compat, "FP32_PRECISION_API", has_fp32_precision)
            assert get_tf32() == TF32(matmul, conv)
    finally:
        set_tf32(*saved)  # through the flags again, which keep both sets of switches in agreement


@pytest.mark.parametrize("has_get_total_norm", [True, False])
def test_total_norm_is_the_l2_norm_of_every_entry(has_get_total_norm, monkeypatch):
    if has_get_total_norm and not hasattr(torch.nn.utils, "get_total_norm"):
        pytest.skip("this torch has no get_total_norm")
    monkeypatch.setattr(compat, "HAS_GET_TOTAL_NORM", has_get_total_norm)
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=generator) for shape in [(3, 4), (7,), (2, 2, 5), ()]]
    expected = torch.cat([tensor.double().flatten() for tensor in tensors]).norm()
    norm = total_norm(tensors)
    assert norm.shape == () and norm.dtype == torch.float32
    assert torch.allclose(norm.double(), expected, rtol=1e-6), f"{norm} != {expected}"
    assert total_norm([]).item() == 0.0


@pytest.mark.parametrize("version, numbers", [("2.13.0+cpu", (2, 13, 0)), ("2.6.0a0+git1a2b3c", (2, 6, 0)),
                                              ("0.19.1+cu121", (0, 19, 1)), ("1.0.9", (1, 0, 9)), ("2.4", (2, 4))])
def test_release_reads_the_numbers_of_local_and_pre_release_versions(version, numbers):
    assert compat.release(version) == numbers


def test_installed_releases_meet_the_declared_minimum():
    assert compat.unsupported_versions() == {}


def test_pyproject_declares_the_minimum_versions_the_clis_check():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for name, minimum in compat.MINIMUM_VERSIONS.items():
        declared = [dependency for dependency in project["dependencies"] if re.match(rf"{name}\b", dependency)]
        assert declared and re.fullmatch(rf"{name}>={re.escape(minimum)}(,<\d+)?", declared[0]), (name, declared)


def supported_versions_but(**overrides):
    """The minimum of every package, except ``overrides`` (None: not installed)."""
    return {**compat.MINIMUM_VERSIONS, **overrides}


def test_old_or_missing_packages_are_named_in_one_sentence_with_the_needed_versions_and_the_fix(monkeypatch):
    monkeypatch.setattr(compat, "INSTALLED_VERSIONS", supported_versions_but(torch="2.3.1+cu121", torchvision="0.18.1"))
    assert compat.version_problem() == (
        "this project needs torch >= 2.4, torchvision >= 0.19 (installed: torch 2.3.1+cu121, torchvision 0.18.1); "
        "run `pip install torch==2.13.0 torchvision==0.28.0`")
    monkeypatch.setattr(compat, "INSTALLED_VERSIONS", supported_versions_but(timm=None))
    assert compat.version_problem() == ('this project needs timm >= 1.0.31 (installed: timm not installed); '
                                        'run `pip install "timm>=1.0.31,<2"`')
    monkeypatch.setattr(compat, "INSTALLED_VERSIONS", supported_versions_but(torch="2.13.0+cpu", timm="1.0.31"))
    assert compat.version_problem() is None


def cli_mains():
    """Every CLI's ``main``, by the name users run it as."""
    modules = {name: importlib.import_module(name) for name in
               ["pretrain", "submitit_pretrain", "submitit_finetune", "finetune.linear_probe", "finetune.features",
                "fcmae.visualize"]}
    return {**{name: module.main for name, module in modules.items()}, "finetune": load_finetune_script().main}


@pytest.mark.parametrize("cli", ["pretrain", "finetune", "submitit_pretrain", "submitit_finetune",
                                 "finetune.linear_probe", "finetune.features", "fcmae.visualize"])
def test_every_cli_stops_on_an_old_torch_before_any_work(cli, tmp_path, monkeypatch, capsys):
    main = cli_mains()[cli]
    monkeypatch.setattr(compat, "INSTALLED_VERSIONS", supported_versions_but(torch="2.1.2"))
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["--output_dir", str(output), "--output", str(output / "x.png"), "--job_dir", str(output)])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(": error: this project needs torch >= 2.4 (installed: torch 2.1.2); "
                                                 "run `pip install torch==2.13.0 torchvision==0.28.0`"), lines
    assert not output.exists()
