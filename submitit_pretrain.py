"""Submit pretrain.py as a Slurm job through submitit (``pip install -e .[submitit]``).

    python submitit_pretrain.py --nodes 8 --ngpus 8 --job_dir /shared/fcmae_base \\
        --model convnextv2_base --batch_size 64 --blr 1.5e-4 --epochs 1600 --warmup_epochs 40 \\
        --data_path /path/to/imagenet-1k

Launcher flags: --nodes --ngpus --timeout --partition --comment --job_dir --use_volta32 (as the
official script), --tasks_per_node --cpus_per_task --mem_gb --cluster; every other flag is
pretrain.py's. The job checkpoints, requeues and resumes on time limits and preemption
(engine/slurm.py).
"""
from pathlib import Path

from engine.compat import require_supported_versions
from engine.slurm import launch


def main(argv=None):
    """Check the flags and submit the job; returns the submitit job."""
    require_supported_versions(Path(__file__).name)
    return launch(Path(__file__).resolve().parent / "pretrain.py", "PRETRAIN_CHECKS", argv)


if __name__ == "__main__":
    main()
