"""Integrations of DDK with training stacks: ``ddk.integrations.transformers`` (``DDKTrainer``,
``DDKConfig``, ``DDKCallback`` for ``transformers.Trainer``), imported only when used, so
``import ddk`` never needs ``transformers``. The ``torch.distributed`` helpers are
``ddk.distributed``."""
