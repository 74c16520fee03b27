"""Training machinery shared by ``pretrain.py`` and ``finetune.py``; each module is one idea.

* ``config``       argparse + YAML defaults (``--config``), shared flags, table-driven validation,
                   resolved-configuration dump.
* ``distributed``  torchrun process group (NCCL on GPU, gloo on CPU), rank helpers, device choice.
* ``seeding``      derived seeds, per-epoch reseeding, RNG state capture/restore.
* ``checkpoint``   atomic files, keep-last-N, latest valid checkpoint, safetensors export.
* ``logging``      progress lines, TensorBoard, JSON-lines metrics.
* ``schedule``     per-update lr: linear warmup then half-cosine to ``min_lr``.
* ``optim``        AdamW without weight decay on norms, biases, GRN and ``no_weight_decay()`` names.
* ``loop``         ``train_one_epoch`` with a caller-supplied loss; AMP, accumulation, clipping.
* ``data``         ImageFolder that skips unreadable files, embedded photos, distributed loader.
* ``cli``          parse + validate, and exit codes for faults (2: configuration, 1: the run).

Modules that import timm or torchvision import ``models`` first (its torchvision guard).
"""
