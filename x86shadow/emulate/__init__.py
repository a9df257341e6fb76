"""Instruction decoding and classification for trapped page-table writes (docs/POLICY_SOURCES.md).

``decode`` (capstone, cached) gives a ``Decoded`` with the classes the policies need; the
alignment / zero-write rules of KVM and Xen are plain functions.  See ``decode.py`` for the
source (file, function, version) of every rule.
"""

from .decode import (
    Decoded,
    MemOperand,
    decode,
    decode_cache_clear,
    decode_cache_info,
    is_control_transfer,
    is_zero_write,
    misaligned_kvm,
    misaligned_kvm2008,
    unaligned_xen,
)

__all__ = [
    "Decoded",
    "MemOperand",
    "decode",
    "decode_cache_clear",
    "decode_cache_info",
    "is_control_transfer",
    "is_zero_write",
    "misaligned_kvm",
    "misaligned_kvm2008",
    "unaligned_xen",
]
