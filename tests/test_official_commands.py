"""The commands of the official ConvNeXt-V2 TRAINING.md, with our script names, parse with the values
they mean and run (scaled down by flags appended after them: atto, 64 px, one epoch, CPU), and every
flag of the official ``main_pretrain.py`` / ``main_finetune.py`` parsers is accepted.

``python -m torch.distributed.launch`` runs ``main_*.py --local-rank=N <flags>``; the submitit forms
(``submitit_*.py --nodes --ngpus --job_dir ...``) pass the same flags on, minus their own.
"""
import logging
import shlex
import subprocess
import sys

import pytest

import pretrain
from engine.cli import parse_and_validate
from engine.config import TRAINING_CHECKS, config_dict
from finetune_helpers import REPO_ROOT, load_finetune_script, make_colour_folder

finetune_cli = load_finetune_script()

# Single-machine commands of TRAINING.md. The official ConvNeXt V2-Tiny one says `--model convnextv2_`
# (a typo: its multi-node twin says convnextv2_tiny); it is written here as meant.
OFFICIAL_COMMANDS = {
    "pretrain base": """python -m torch.distributed.launch --nproc_per_node=8 main_pretrain.py \
        --model convnextv2_base --batch_size 64 --update_freq 8 --blr 1.5e-4 --epochs 1600 --warmup_epochs 40 \
        --data_path /path/to/imagenet-1k --output_dir /path/to/save_results""",
    "finetune base": """python -m torch.distributed.launch --nproc_per_node=8 main_finetune.py \
        --model convnextv2_base --batch_size 32 --update_freq 4 --blr 6.25e-4 --epochs 100 --warmup_epochs 20 \
        --layer_decay_type 'group' --layer_decay 0.6 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 \
        --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --model_ema True --model_ema_eval True --use_amp True \
        --finetune /path/to/checkpoint --data_path /path/to/imagenet-1k --output_dir /path/to/save_results""",
    "finetune atto": """python -m torch.distributed.launch --nproc_per_node=8 main_finetune.py \
        --model convnextv2_atto --batch_size 32 --update_freq 4 --blr 2e-4 --epochs 600 --warmup_epochs 0 \
        --layer_decay_type 'single' --layer_decay 0.9 --weight_decay 0.3 --drop_path 0.1 --reprob 0.25 \
        --mixup 0. --cutmix 0. --smoothing 0.2 --model_ema True --model_ema_eval True --use_amp True \
        --finetune /path/to/checkpoint --data_path /path/to/imagenet-1k --output_dir /path/to/save_results""",
    "finetune tiny": """python -m torch.distributed.launch --nproc_per_node=8 main_finetune.py \
        --model convnextv2_tiny --batch_size 32 --update_freq 4 --blr 8e-4 --epochs 300 --warmup_epochs 40 \
        --layer_decay_type 'single' --layer_decay 0.9 --weight_decay 0.05 --drop_path 0.2 --reprob 0.25 \
        --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --model_ema True --model_ema_eval True --use_amp True \
        --finetune /path/to/checkpoint --data_path /path/to/imagenet-1k --output_dir /path/to/save_results""",
}
EXPECTED = {  # what each command means, as parsed (--use_amp True: --amp auto, bf16 on a current GPU)
    "pretrain base": dict(model="convnextv2_base", batch_size=64, update_freq=8, blr=1.5e-4, epochs=1600,
                          warmup_epochs=40, norm_pix_loss=True, auto_resume=True, amp="auto"),
    "finetune base": dict(model="convnextv2_base", batch_size=32, update_freq=4, blr=6.25e-4, epochs=100,
                          warmup_epochs=20, layer_decay_type="group", layer_decay=0.6, weight_decay=0.05,
                          drop_path=0.1, reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, model_ema=True,
                          model_ema_eval=True, amp="auto", eval=False, dist_eval=True),
    "finetune atto": dict(model="convnextv2_atto", blr=2e-4, epochs=600, warmup_epochs=0, layer_decay_type="single",
                          layer_decay=0.9, weight_decay=0.3, mixup=0.0, cutmix=0.0, smoothing=0.2, model_ema=True,
                          amp="auto"),
    "finetune tiny": dict(model="convnextv2_tiny", blr=8e-4, epochs=300, warmup_epochs=40, drop_path=0.2,
                          layer_decay_type="single", model_ema_eval=True, amp="auto"),
}
# Every flag of the official parsers, with its official default where a command line can write it
# (flags whose default is None cannot be written and are left out). --output_dir and --data_path are
# given real folders by the test.
OFFICIAL_PRETRAIN_FLAGS = """--batch_size 64 --epochs 800 --warmup_epochs 40 --update_freq 1 --model convnextv2_base
    --input_size 224 --mask_ratio 0.6 --norm_pix_loss --decoder_depth 1 --decoder_embed_dim 512 --weight_decay 0.05
    --blr 1.5e-4 --min_lr 0. --device cpu --seed 0 --resume '' --auto_resume True --save_ckpt True
    --save_ckpt_freq 1 --save_ckpt_num 3 --start_epoch 0 --num_workers 10 --pin_mem True --world_size 1
    --local_rank -1 --dist_on_itp False --dist_url env://"""
OFFICIAL_FINETUNE_FLAGS = """--batch_size 64 --epochs 100 --update_freq 1 --model convnextv2_base --input_size 224
    --drop_path 0. --layer_decay_type single --model_ema False --model_ema_decay 0.9999 --model_ema_force_cpu False
    --model_ema_eval False --weight_decay 0.05 --blr 5e-4 --layer_decay 1.0 --min_lr 1e-6 --warmup_epochs 20
    --warmup_steps -1 --opt adamw --opt_eps 1e-8 --momentum 0.9 --aa rand-m9-mstd0.5-inc1 --smoothing 0.1
    --train_interpolation bicubic --reprob 0.25 --remode pixel --recount 1 --resplit False --mixup 0. --cutmix 0.
    --mixup_prob 1.0 --mixup_switch_prob 0.5 --mixup_mode batch --finetune '' --head_init_scale 0.001
    --model_key 'model|module' --model_prefix '' --nb_classes 1000 --device cpu --seed 0 --resume ''
    --imagenet_default_mean_and_std True --data_set IMNET --auto_resume True --save_ckpt True --save_ckpt_freq 1
    --save_ckpt_num 3 --start_epoch 0 --eval False --dist_eval True --disable_eval False --num_workers 10
    --pin_mem True --world_size 1 --local_rank -1 --dist_on_itp False --dist_url env:// --use_amp False"""
LAUNCHER = ["--local-rank=0"]  # what torch.distributed.launch puts before the script's own flags
SCALED_DOWN = ["--model", "convnextv2_atto", "--input_size", "64", "--epochs", "1", "--warmup_epochs", "0",
               "--batch_size", "2", "--update_freq", "1", "--num_workers", "0", "--device", "cpu", "--cpu_threads",
               "1", "--print_freq", "1"]
CLIS = {"pretrain": pretrain, "finetune": finetune_cli}


def script_flags(command: str, data, checkpoint, output) -> list[str]:
    """The flags after ``main_*.py`` in ``command``, with its placeholder paths made real."""
    words = shlex.split(command)
    flags = words[next(i for i, word in enumerate(words) if word.endswith(".py") and "main_" in word) + 1:]
    places = {"/path/to/imagenet-1k": str(data), "/path/to/checkpoint": str(checkpoint),
              "/path/to/save_results": str(output)}
    return [places.get(word, word) for word in flags]


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    """<root>/train and <root>/val with 4 colour classes (2 and 1 images each), as ImageNet is laid out."""
    root = tmp_path_factory.mktemp("imagenet_like")
    make_colour_folder(root / "train", per_class=2, size=72, seed=0)
    make_colour_folder(root / "val", per_class=1, size=72, seed=1)
    return root


def parse(cli: str, argv: list[str]):
    parser = CLIS[cli].build_parser()
    checks = TRAINING_CHECKS + (pretrain.PRETRAIN_CHECKS if cli == "pretrain" else finetune_cli.FINETUNE_CHECKS)
    return parse_and_validate(parser, argv, checks, demo_argv=["--config", str(CLIS[cli].DEMO_CONFIG)])


@pytest.mark.parametrize("name", list(OFFICIAL_COMMANDS))
@pytest.mark.parametrize("local_rank", ["--local-rank=0", "--local_rank=0"])
def test_official_command_parses_to_what_it_means(name, local_rank, imagenet_like, tmp_path):
    checkpoint = tmp_path / "encoder.pt"
    checkpoint.touch()
    flags = script_flags(OFFICIAL_COMMANDS[name], imagenet_like, checkpoint, tmp_path / "out")
    args = parse(name.split()[0], [local_rank, *flags])
    assert {dest: getattr(args, dest) for dest in EXPECTED[name]} == EXPECTED[name]
    assert not args.demo and args.data_path == str(imagenet_like)
    assert args.notes == ["--local_rank 0: ignored; the launcher's LOCAL_RANK environment variable gives the "
                          "local rank"]


@pytest.mark.parametrize("cli, flags", [("pretrain", OFFICIAL_PRETRAIN_FLAGS), ("finetune", OFFICIAL_FINETUNE_FLAGS)])
def test_every_official_flag_is_accepted_at_its_official_default(cli, flags, imagenet_like, tmp_path):
    args = parse(cli, [*shlex.split(flags), "--data_path", str(imagenet_like), "--output_dir", str(tmp_path)])
    assert args.notes == [
        "--local_rank -1: ignored; the launcher's LOCAL_RANK environment variable gives the local rank",
        "--world_size 1: ignored; the launcher's WORLD_SIZE environment variable gives the number of processes"]
    assert (args.auto_resume, args.pin_mem, args.resume) == (True, True, None)
    if cli == "finetune":
        assert (args.model_ema, args.model_ema_eval, args.amp, args.finetune, args.eval) == (False, False, "none",
                                                                                             None, False)


@pytest.mark.parametrize("flag_args, dest, value", [
    (["--auto_resume", "False"], "auto_resume", False), (["--auto_resume", "0"], "auto_resume", False),
    (["--pin_mem", "false"], "pin_mem", False), (["--use_amp", "True"], "amp", "auto"),
    (["--use_amp", "False"], "amp", "none"), (["--use_checkpoint", "True"], "grad_checkpointing", True),
    (["--norm_pix_loss", "False"], "norm_pix_loss", False), (["--eval"], "eval", True), (["--eval", "1"], "eval", True),
])
def test_official_boolean_values_are_honoured(flag_args, dest, value, imagenet_like):
    cli = "finetune" if dest == "eval" else "pretrain"
    assert getattr(parse(cli, [*flag_args, "--data_path", str(imagenet_like)]), dest) == value


def test_accepted_official_booleans_take_the_same_forms(imagenet_like):
    args = parse("finetune", ["--save_ckpt", "--no-resplit", "--disable_eval", "0", "--data_path", str(imagenet_like)])
    assert args.notes == []
    args = parse("finetune", ["--no-save_ckpt", "--data_path", str(imagenet_like)])
    assert args.notes == ["--save_ckpt False: ignored; checkpoints are always written (resuming needs them); "
                          "--save_ckpt_freq sets how often"]


def test_save_ckpt_is_its_own_flag_not_an_ambiguous_prefix(imagenet_like):
    args = parse("pretrain", ["--save_ckpt", "True", "--save_ckpt_freq", "2", "--data_path", str(imagenet_like)])
    assert args.save_ckpt_freq == 2 and args.notes == []
    args = parse("pretrain", ["--save_ckpt", "False", "--start_epoch", "5", "--dist_url", "tcp://h:1",
                              "--data_path", str(imagenet_like)])
    assert [note.split(":")[0] for note in args.notes] == ["--dist_url tcp", "--start_epoch 5", "--save_ckpt False"]
    assert not hasattr(args, "save_ckpt") and "start_epoch" not in config_dict(args)


@pytest.fixture(scope="module")
def official_runs(imagenet_like, tmp_path_factory):
    """The official pretraining command, then the official base fine-tuning command from its encoder,
    both scaled down by appended flags and run in-process to the end."""
    root = tmp_path_factory.mktemp("official_runs")
    pretrain.main([*LAUNCHER, *script_flags(OFFICIAL_COMMANDS["pretrain base"], imagenet_like, None,
                                            root / "pretrain"), *SCALED_DOWN])
    encoder = root / "pretrain" / "encoder.safetensors"
    best = finetune_cli.main([*LAUNCHER, *script_flags(OFFICIAL_COMMANDS["finetune base"], imagenet_like, encoder,
                                                       root / "finetune"), *SCALED_DOWN,
                              "--layer_decay_type", "single"])  # group decay is meant for base's depths
    return {"root": root, "encoder": encoder, "best": best}


def test_official_pretraining_command_runs_to_the_end(official_runs):
    output = official_runs["root"] / "pretrain"
    assert (output / "checkpoint-1.pth").is_file() and official_runs["encoder"].is_file()
    log = (output / "train.log").read_text()
    assert "--local_rank 0: ignored; the launcher's LOCAL_RANK" in log


def test_official_finetuning_command_runs_to_the_end(official_runs):
    output = official_runs["root"] / "finetune"
    assert (output / "checkpoint-1.pth").is_file() and (output / "checkpoint-best-ema.pth").is_file()
    assert set(official_runs["best"]) == {"model", "ema"}  # --model_ema True --model_ema_eval True


def test_eval_scores_a_checkpoint_at_its_own_size_and_crop(official_runs, imagenet_like, caplog):
    """`--eval --resume CKPT` without --model/--input_size: the checkpoint's atto at 64 px (the flag
    defaults, convnextv2_base at 224 px, would not even load it), the same score as with the flags given."""
    path = official_runs["root"] / "finetune" / "checkpoint-best.pth"
    common = ["--eval", "True", "--resume", str(path), "--data_path", str(imagenet_like), "--num_workers", "0",
              "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        implicit = finetune_cli.main(common)
    assert (f"evaluating {path} with --model convnextv2_atto (from the checkpoint), --input_size 64 (from the "
            "checkpoint), --crop_pct None (from the checkpoint)") in caplog.text
    explicit = finetune_cli.main([*common, "--model", "convnextv2_atto", "--input_size", "64", "--crop_pct", "0.875"])
    assert implicit["model"] == explicit["model"]
    assert implicit["model"]["acc1"] == pytest.approx(official_runs["best"]["model"]["acc1"])


@pytest.mark.slow
def test_torch_distributed_launch_form_runs(imagenet_like, tmp_path):
    """The real launcher (it passes --local-rank=0 and sets the environment), one process."""
    command = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=1", "pretrain.py",
               *script_flags(OFFICIAL_COMMANDS["pretrain base"], imagenet_like, None, tmp_path / "out"), *SCALED_DOWN]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoint-1.pth").is_file()
    assert "--local_rank 0: ignored" in (tmp_path / "out" / "train.log").read_text()
