"""``twinflow train``: TwinFlow fine-tuning of diffusers backbones on one process or many.

Modules: ``config`` (YAML → validated dataclasses), ``data`` (parquet / image folder /
precomputed rows, DistributedSampler), ``models`` (per-backbone loading and the TwinFlow model
call), ``teacher`` (EMA copy or LoRA teacher adapter), ``distributed`` (torchrun, DDP, FSDP2),
``checkpoint`` (atomic, verified checkpoints), ``trainer`` (the loop), ``command`` (the CLI).
Nothing heavy is imported here, so that ``twinflow --help`` stays fast. Guide:
docs/large_training.md.
"""
