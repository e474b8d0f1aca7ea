"""Public kernel API on torch tensors (DESIGN §4). `reference` holds the pure-torch references."""
from .._errors import require_torch

require_torch(__name__)  # first: a clear message, not a traceback, when torch is missing
from . import reference
from .codec import conv1d, conv_transpose1d
from .sampling import MAX_TOP_K_CUDA, sample_tokens
from .attention import PagedAttentionPlan, paged_attention, store_kv, varlen_attention
from .linear import LINEAR_SMALL_M_MAX_ROWS, linear_small_m
from .elementwise import fuse_embeddings, fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul

__all__ = [
    "reference",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "fuse_embeddings",
    "linear_small_m",
    "LINEAR_SMALL_M_MAX_ROWS",
    "conv1d",
    "conv_transpose1d",
    "sample_tokens",
    "MAX_TOP_K_CUDA",
    "store_kv",
    "paged_attention",
    "varlen_attention",
    "PagedAttentionPlan",
]
