"""Training machinery shared by ``pretrain.py`` and ``finetune.py``; each module is one idea.

* ``errors``       ``ConfigError``, the configuration error every module may raise (exit code 2).
* ``config``       argparse + YAML defaults (``--config``), shared flags, table-driven validation,
                   resolved-configuration dump.
* ``distributed``  torchrun process group (NCCL on GPU, gloo on CPU) on a store prefix fresh for
                   each restart round, rank helpers, device choice, announcing a rank's failure.
* ``seeding``      derived seeds, reseeding every RNG per micro-batch.
* ``checkpoint``   atomic files, epoch and mid-epoch checkpoints, keep-last-N, latest valid one,
                   the run-layout check on resume, safetensors export.
* ``logging``      progress lines, TensorBoard, JSON-lines metrics.
* ``trackers``     where a run's numbers go: TensorBoard, optional W&B and MLflow (rank 0), each step
                   once (the optimizer updates done), the tracker runs kept in checkpoints.
* ``progress_bar`` a terminal progress bar (rank 0) and the logged duration of long non-training work.
* ``schedule``     per-update lr: linear warmup then half-cosine to ``min_lr``.
* ``optim``        AdamW without weight decay on norms, biases, GRN and ``no_weight_decay()`` names.
* ``stepper``      ``GradientStepper``: AMP, backward, accumulation (the one owner of
                   ``update_freq``), clipping, optimizer updates (skipped on non-finite
                   gradients), the EMA.
* ``progress``     an epoch's device-side metrics, read and checked only at log points.
* ``loop``         ``train_updates``: the micro-batch loop of one epoch, yielding after each update.
* ``flops``        FLOPs of a step (counted once, on fake tensors), GPU peak table, MFU.
* ``compat``       the supported torch/torchvision/timm releases (checked at CLI start-up), and
                   what differs between them: the TF32 switches, the total gradient norm.
* ``agreement``    per-update decisions (stop, time-based checkpoint) agreed through the job's store.
* ``signals``      SIGTERM/SIGUSR1 -> checkpoint at the next update boundary -> exit 3; the stop
                   marker that torchrun's restarted workers honour.
* ``interrupts``   Ctrl-C held back while a file or a tracker is being written (a second one is not).
* ``runner``       ``launch`` and ``run_training(args, info, task)``: the skeleton both CLIs share;
                   ``Trainer`` holds one run's epochs.
* ``image_index``  the paths (and labels) of a dataset's images in a few numpy arrays.
* ``image_files``  finding images: folders in any layout, class folders, file lists.
* ``index_cache``  one scan per run (rank 0), reused while the folder is unchanged.
* ``image_decode`` decoding files for 1, 3 or N channels; what counts as unreadable.
* ``normalization`` per-channel mean/std: ImageNet's, given, or measured on the data.
* ``shards``       WebDataset shards: naming them (brace patterns, shard lists, ``pipe:`` commands), their
                   index (local shards read at random, remote ones streamed), the order of streamed shards.
* ``shard_writer`` ``python -m engine.shard_writer SRC OUT``: a folder or file list written as shards.
* ``data``         datasets that skip unreadable files (any folder, class folders, file lists, shards),
                   transforms for N channels, embedded photos, per-sample seeded and resumable
                   distributed loaders, fast JPEG decoding.
* ``class_folders`` labels = sorted class folder names; two splits must have the same folders.
* ``eval_transform`` the official evaluation resize / center crop and normalisation (also in timm's terms).
* ``hub``          timm model folders (config.json, model.safetensors, model card) for ``local-dir:``/the Hub.
* ``embeddings``   pooled embedding and stage maps of a timm ConvNeXt V2.
* ``knn``          weighted k-NN classifier on frozen features, on one process or a bank sharded
                   over the ranks.
* ``cli``          parse + validate, and exit codes for faults (2: configuration, 1: the run).
* ``slurm``        Slurm jobs through submitit: launcher flags, the submitted callable, stop-save-requeue.

Modules that import timm or torchvision import ``models`` first (its torchvision guard).
"""
