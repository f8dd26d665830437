"""Hand-written Mosaic GPU kernels for Hopper (wgmma, TMA, warp specialization).

Same contracts as the Triton kernels in `pallas_kernels`; each also runs in the Mosaic GPU
interpreter on CPU.
"""

from pallas_kernels.mosaic.flash_attention import BlockSizes as MosaicBlockSizes
from pallas_kernels.mosaic.flash_attention import flash_attention_mosaic, interpreter

__all__ = ["MosaicBlockSizes", "flash_attention_mosaic", "interpreter"]
