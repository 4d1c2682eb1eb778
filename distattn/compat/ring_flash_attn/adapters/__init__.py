"""Adapters of ring-flash-attention's API to model libraries (``hf_adapter``: transformers)."""
