"""Fine-tuning and transfer for ConvNeXt V2 (the machinery shared with pretraining is ``engine``).

* ``model``         dense timm model from any checkpoint, new classifier (trunc-normal 2e-5).
* ``data``          train/val folders with the same classes, or the embedded photos.
* ``transforms``    timm's training transform (the evaluation one is ``engine.eval_transform``).
* ``mixup``         Mixup/CutMix soft targets and the matching loss.
* ``evaluate``      top-1 / top-5 / loss, exact under distributed evaluation.
* ``features``      pooled embeddings and stage maps: Python API and ``python -m finetune.features``.
* ``linear_probe``  linear classifier on frozen features; ``python -m finetune.linear_probe``.
* ``knn``           k-NN top-1 alone: ``python -m finetune.knn`` (the classifier is ``engine.knn``).

``finetune.py`` at the repository root is the fine-tuning command line; its layer-wise lr decay
groups come from ``models.layer_decay``. Import the submodules
(``from finetune.features import FeatureExtractor``); the package itself imports nothing, so
``python -m finetune.features`` runs its module exactly once.
"""
