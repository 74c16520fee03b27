"""Training machinery shared by ``pretrain.py`` and ``finetune.py``; each module is one idea.

* ``config``       argparse + YAML defaults (``--config``), shared flags, table-driven validation,
                   resolved-configuration dump.
* ``distributed``  torchrun process group (NCCL on GPU, gloo on CPU), rank helpers, device choice.
* ``seeding``      derived seeds, reseeding every RNG per micro-batch.
* ``checkpoint``   atomic files, epoch and mid-epoch checkpoints, keep-last-N, latest valid one,
                   safetensors export.
* ``logging``      progress lines, TensorBoard, JSON-lines metrics.
* ``schedule``     per-update lr: linear warmup then half-cosine to ``min_lr``.
* ``optim``        AdamW without weight decay on norms, biases, GRN and ``no_weight_decay()`` names.
* ``loop``         ``train_one_epoch`` with a caller-supplied loss; AMP, accumulation, clipping,
                   device-side metrics read only at log points.
* ``ema``          EMA of the weights, updated after each optimizer update.
* ``flops``        FLOPs of a step, GPU peak table, model FLOP utilisation.
* ``compat``       the supported torch/torchvision/timm releases (checked at CLI start-up), and
                   what differs between them: the TF32 switches, the total gradient norm.
* ``signals``      SIGTERM/SIGUSR1 -> checkpoint at the next update boundary -> exit 3.
* ``runner``       ``run_training(args, info, task)``: the training skeleton both CLIs share.
* ``data``         ImageFolder that skips unreadable files, embedded photos, per-sample seeded and
                   resumable distributed loaders, fast JPEG decoding.
* ``cli``          parse + validate, and exit codes for faults (2: configuration, 1: the run).
* ``slurm``        Slurm jobs through submitit: launcher flags, the submitted callable, stop-save-requeue.

Modules that import timm or torchvision import ``models`` first (its torchvision guard).
"""
