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
* ``signals``      SIGTERM/SIGUSR1 -> checkpoint at the next update boundary -> exit 3.
* ``runner``       ``run_training(args, info, task)``: the training skeleton both CLIs share.
* ``image_index``  the paths (and labels) of a dataset's images in a few numpy arrays.
* ``image_files``  finding images: folders in any layout, class folders, file lists.
* ``index_cache``  one scan per run (rank 0), reused while the folder is unchanged.
* ``image_decode`` decoding files for 1, 3 or N channels; what counts as unreadable.
* ``normalization`` per-channel mean/std: ImageNet's, given, or measured on the data.
* ``data``         datasets that skip unreadable files (any folder, class folders, file lists),
                   transforms for N channels, embedded photos, per-sample seeded and resumable
                   distributed loaders, fast JPEG decoding.
* ``cli``          parse + validate, and exit codes for faults (2: configuration, 1: the run).
* ``slurm``        Slurm jobs through submitit: launcher flags, the submitted callable, stop-save-requeue.

Modules that import timm or torchvision import ``models`` first (its torchvision guard).
"""
