"""``distattn.compat.yunchang``: yunchang's public API (``set_seq_parallel_pg``,
``PROCESS_GROUP``, ``LongContextAttention`` / ``LongContextAttentionQKVPacked`` /
``UlyssesAttention``, ``EXTRACT_FUNC_DICT``) as thin adapters over distattn; docs/COMPAT.md."""
from .comm import EXTRACT_FUNC_DICT
from .globals import PROCESS_GROUP, set_seq_parallel_pg
from .hybrid import LongContextAttention, LongContextAttentionQKVPacked, UlyssesAttention

SUBMODULES = ("globals", "comm", "hybrid")
