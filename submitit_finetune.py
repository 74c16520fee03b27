"""Submit finetune.py as a Slurm job through submitit (``pip install -e .[submitit]``).

    python submitit_finetune.py --nodes 4 --ngpus 8 --job_dir /shared/finetune_base \\
        --model convnextv2_base --batch_size 32 --blr 6.25e-4 --epochs 100 --warmup_epochs 20 \\
        --finetune /shared/fcmae_base/encoder.safetensors --data_path /path/to/imagenet-1k

Launcher flags as in submitit_pretrain.py; every other flag is finetune.py's.
"""
from pathlib import Path

from engine.compat import require_supported_versions
from engine.slurm import launch


def main(argv=None):
    """Check the flags and submit the job; returns the submitit job."""
    require_supported_versions(Path(__file__).name)
    return launch(Path(__file__).resolve().parent / "finetune.py", "FINETUNE_CHECKS", argv)


if __name__ == "__main__":
    main()
