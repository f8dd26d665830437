"""Hand-written Mosaic GPU kernels for Hopper (wgmma, TMA, warp specialization).

Same contracts as the Triton kernels in `pallas_kernels`; each also runs in the Mosaic GPU
interpreter on CPU.
"""

from pallas_kernels.mosaic.flash_attention import BlockSizes as MosaicBlockSizes
from pallas_kernels.mosaic._common import interpreter
from pallas_kernels.mosaic.flash_attention import flash_attention_mosaic
from pallas_kernels.mosaic.quant_matmul import BlockSizes as MosaicQuantBlockSizes
from pallas_kernels.mosaic.quant_matmul import quant_matmul_mosaic
from pallas_kernels.mosaic.quant_matmul import supports as quant_matmul_mosaic_supports

__all__ = ["MosaicBlockSizes", "MosaicQuantBlockSizes", "flash_attention_mosaic", "interpreter",
           "quant_matmul_mosaic", "quant_matmul_mosaic_supports"]
