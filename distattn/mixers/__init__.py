"""Sequence mixers other than softmax attention under sequence parallelism.

Mamba / Mamba2 layers, Gated DeltaNet, lightning attention and short causal convolutions mix
tokens along the sequence, so under SP a layer that sees only its rank's shard is wrong. This
subpackage runs them exactly:

- ``gather`` (``gather.py``): the layer runs, unchanged (the model's own code), on the whole
  sequence gathered from the SP group; each rank keeps its tokens of the result. Exact for
  any mixer and any layout, forward and backward; it costs what the layer costs on the full
  sequence on every rank (compute and activation memory of that layer do not shrink with P)
  plus one all-gather forward and one all-reduce backward of the layer's input.

- ``passing`` (``passing.py``): under the ``contiguous`` layout each rank runs the layer on
  its own tokens, starting from what the previous rank hands it -- the last k - 1 inputs of a
  causal conv (``exchange_halo``) and the final state of a recurrence
  (``receive_from_previous`` / ``send_to_next``) -- and gradients travel back the same way.
  Compute and memory shrink with P; a recurrent layer is a chain of P - 1 hops.
"""
from .gather import gather_sequence, local_part  # noqa: F401
from .passing import (exchange_halo, receive_from_previous, send_to_next,  # noqa: F401
                      sequence_neighbours)
