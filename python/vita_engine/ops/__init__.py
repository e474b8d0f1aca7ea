"""Public kernel API on torch tensors (DESIGN §4). `reference` holds the pure-torch references."""
from . import reference
from .sampling import MAX_TOP_K_CUDA, sample_tokens
from .elementwise import fuse_embeddings, fused_add_rms_norm, rms_norm, rotary_embedding, silu_and_mul

__all__ = [
    "reference",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "fuse_embeddings",
    "sample_tokens",
    "MAX_TOP_K_CUDA",
]
