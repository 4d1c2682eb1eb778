"""``distattn.compat.ring_flash_attn``: the public API of ring-flash-attention 0.1.x (same
names, signatures, layouts and return conventions) as thin adapters over
``distattn.dist_flash_attn``; see docs/COMPAT.md. Import it directly, or let clients that say
``import ring_flash_attn`` find it with ``distattn.compat.alias("ring_flash_attn")``."""
from .llama3_flash_attn_varlen import (llama3_flash_attn_prepare_cu_seqlens,
                                       llama3_flash_attn_varlen_func,
                                       llama3_flash_attn_varlen_kvpacked_func,
                                       llama3_flash_attn_varlen_qkvpacked_func)
from .ring_flash_attn import (ring_flash_attn_func, ring_flash_attn_kvpacked_func,
                              ring_flash_attn_qkvpacked_func)
from .ring_flash_attn_varlen import (ring_flash_attn_varlen_func,
                                     ring_flash_attn_varlen_kvpacked_func,
                                     ring_flash_attn_varlen_qkvpacked_func)
from .stripe_flash_attn import (stripe_flash_attn_func, stripe_flash_attn_kvpacked_func,
                                stripe_flash_attn_qkvpacked_func)
from .zigzag_ring_flash_attn import (zigzag_ring_flash_attn_func,
                                     zigzag_ring_flash_attn_kvpacked_func,
                                     zigzag_ring_flash_attn_qkvpacked_func)
from .zigzag_ring_flash_attn_varlen import (zigzag_ring_flash_attn_varlen_func,
                                            zigzag_ring_flash_attn_varlen_kvpacked_func,
                                            zigzag_ring_flash_attn_varlen_qkvpacked_func)

SUBMODULES = ("ring_flash_attn", "ring_flash_attn_varlen", "zigzag_ring_flash_attn",
              "zigzag_ring_flash_attn_varlen", "stripe_flash_attn", "llama3_flash_attn_varlen",
              "adapters", "adapters.hf_adapter")
