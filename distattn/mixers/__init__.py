"""Sequence mixers other than softmax attention under sequence parallelism.

Mamba / Mamba2 layers, Gated DeltaNet, lightning attention and short causal convolutions mix
tokens along the sequence, so under SP a layer that sees only its rank's shard is wrong. This
subpackage runs them exactly:

- ``gather`` (``gather.py``): the layer runs, unchanged (the model's own code), on the whole
  sequence gathered from the SP group; each rank keeps its tokens of the result. Exact for
  any mixer and any layout, forward and backward; it costs what the layer costs on the full
  sequence on every rank (compute and activation memory of that layer do not shrink with P)
  plus one all-gather forward and one all-reduce backward of the layer's input.

State passing (a conv halo, recurrent states handed from rank to rank) is the scalable form
still to come; ``docs/DESIGN.md`` says where it will plug in.
"""
from .gather import gather_sequence, local_part  # noqa: F401
