"""A DLRM-style click model on a `ShardedEmbeddingBagCollection`, trained by torchrun on a
generated Criteo-shaped dataset whose Bayes AUC is known (``python -m sharded_embedding.dlrm``,
``launch/dlrm.sh``, ``configs/dlrm.yaml``; docs/recommendation.md).

Modules: `data` (the generator and its planted model), `model` (DLRM), `metrics` (AUC),
`config` (the Hydra schema), `loop` (training, evaluation, checkpoints, outputs).
"""
