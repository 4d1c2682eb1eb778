"""Integrations of distattn with training frameworks.

- ``distattn.integrations.transformers`` (import it as ``dtf``): an ``AttentionInterface``
  entry for Hugging Face transformers models, ``shard_batch``, ``sp_loss`` and
  ``checkpoint_layers``. Needs the optional ``transformers`` dependency.
- ``distattn.integrations.checkpoint``: rematerialization-aware activation checkpointing
  (the recomputation in backward reuses the saved attention output instead of running the
  distributed attention forward again). Framework-independent; torch only.

Nothing is imported here eagerly, so ``import distattn`` never pulls in transformers.
"""
