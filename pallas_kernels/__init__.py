"""Hand-written Pallas (Triton) GPU kernels for Llama, each with a plain-jnp reference.

Every kernel runs on CPU in interpret mode too; its reference is the model's XLA fallback.
"""

from pallas_kernels.decode_attention import BlockSizes as DecodeBlockSizes
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.rms_norm import BlockSizes as RMSNormBlockSizes
from pallas_kernels.rms_norm import rms_norm, rms_norm_reference

__all__ = [
    "DecodeBlockSizes",
    "decode_attention",
    "decode_attention_reference",
    "RMSNormBlockSizes", "rms_norm", "rms_norm_reference"]
