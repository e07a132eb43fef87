"""GGUF's Q4_K blocks, which the `gguf` package reads (gguf.quants.Q4_K.dequantize_blocks) but cannot write.

A super-block of 256 weights is 8 sub-blocks of 32, each w ≈ d·sc_j·q − dmin·m_j with q in 0…15, sc_j and m_j
6-bit integers, d and dmin float16 (144 bytes: 4.5 bits a weight). Each sub-block takes its own min-max range
(the minimum clamped to ≤ 0, as llama.cpp's quantizer does); the 8 ranges are then rounded onto the 6-bit grids of
the super-block's d and dmin, and the weights rounded onto the result. llama.cpp's reference quantizer
(make_qkx2_quants) also searches each sub-block's range for the least squared error; this one does not, so its
error is that of plain min-max rounding (tests/test_export_gguf.py holds it to Q4_1's on the same weights).
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # weights in a super-block
SUB = 32  # weights in a sub-block
BYTES = 2 + 2 + 12 + QK_K // 2  # d, dmin, 8 packed (scale, min) pairs, 256 nibbles


def quantize(rows: np.ndarray) -> np.ndarray:
    """(R, K) float, K a multiple of 256 → (R, K / 256 · 144) uint8 Q4_K blocks."""
    r, k = rows.shape
    x = rows.astype(np.float32).reshape(-1, QK_K // SUB, SUB)  # (blocks, 8, 32)
    lo = np.minimum(x.min(-1), 0.0)  # (blocks, 8)
    scale = (x.max(-1) - lo) / 15.0
    mins = 0.0 - lo  # (not −lo: a +0.0 minimum, never a float16 −0)
    d = (scale.max(-1) / 63.0).astype(np.float16)  # (blocks,)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(np.divide(mins, dmin32, out=np.zeros_like(mins), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    step = (d32 * sc)[..., None]  # (blocks, 8, 1): the sub-block's scale as stored
    offset = (dmin32 * m)[..., None]
    q = np.clip(np.round(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    q = q.reshape(-1, 4, 2, SUB)  # sub-blocks 2i (low nibbles) and 2i+1 (high) share 32 bytes
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, QK_K // 2)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _pack(sc, m), qs],
                          axis=-1).reshape(r, k // QK_K * BYTES)


def _pack(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins → 12 bytes (the layout Q4_K.get_scale_min unpacks): bytes 0–3 scales 0–3 with
    the high 2 bits of scales 4–7 on top, bytes 4–7 the same for mins, bytes 8–11 the low nibbles of scales 4–7
    (low) and mins 4–7 (high)."""
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=-1).astype(np.uint8)
