"""Hand-written Pallas (Triton) GPU kernels for Llama, each with a plain-jnp reference.

Every kernel also runs on CPU in interpret mode. The model's XLA path is the memory-bounded
`blocked_attention` (plain JAX); each kernel's naive reference is what tests compare against.
pallas_kernels imports nothing from llama_jax.
"""

from pallas_kernels._common import MASK_VALUE, normalize_masks, sm_scale_or_default
from pallas_kernels.blocked_attention import (blocked_attention, blocked_decode_attention,
                                              blocked_paged_decode_attention)
from pallas_kernels.decode_attention import BlockSizes as DecodeBlockSizes
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.flash_attention import BlockSizes as FlashBlockSizes
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.mosaic import (MosaicBlockSizes, MosaicQuantBlockSizes, flash_attention_mosaic, quant_matmul_mosaic,
                                   quant_matmul_mosaic_supports)
from pallas_kernels.paged_attention import BlockSizes as PagedBlockSizes
from pallas_kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.quant_matmul import DECODE_ROWS as QUANT_DECODE_ROWS
from pallas_kernels.quant_matmul import BlockSizes as QuantBlockSizes
from pallas_kernels.quant_matmul import quant_matmul, quant_matmul_reference
from pallas_kernels.quant_matmul import supports as quant_matmul_supports
from pallas_kernels.rms_norm import BlockSizes as RMSNormBlockSizes
from pallas_kernels.rms_norm import rms_norm, rms_norm_reference

__all__ = [
    "MASK_VALUE",
    "normalize_masks",
    "sm_scale_or_default",
    "blocked_attention",
    "blocked_decode_attention",
    "blocked_paged_decode_attention",
    "DecodeBlockSizes",
    "FlashBlockSizes",
    "RMSNormBlockSizes",
    "decode_attention",
    "decode_attention_reference",
    "flash_attention",
    "flash_attention_reference",
    "flash_attention_mosaic",
    "MosaicBlockSizes",
    "MosaicQuantBlockSizes",
    "QUANT_DECODE_ROWS",
    "quant_matmul_mosaic",
    "quant_matmul_mosaic_supports",
    "PagedBlockSizes",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "QuantBlockSizes",
    "quant_matmul",
    "quant_matmul_reference",
    "quant_matmul_supports",
    "rms_norm",
    "rms_norm_reference",
]
