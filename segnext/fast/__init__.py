"""SegNeXt's GPU fast path: fused Triton kernels and the switch that installs them."""

from segnext.fast.msca_triton import FusedMSCA, fused_strip_sum, fused_strips_available
from segnext.fast.options import apply_fast_path

__all__ = ["FusedMSCA", "apply_fast_path", "fused_strip_sum", "fused_strips_available"]
