"""The "panels" layout of 2..8-bit weight codes: the operand of `interop.compiled`'s integer product (`c-int8`).

Panels of PANEL_ROWS = 16 rows; per panel, per step of 4 input columns:

- 2..4 bits, `(out, in/2)` uint8: 32 bytes, byte `4r + c` holding `Q + 8` of row `r` (low nibble) and of row
  `r + 8` (high nibble) at column `4s + c` (r in 0..7, c in 0..3);
- 5..8 bits, `(out, in)` uint8: 64 bytes, byte `4r + c` of the first 32 holding `Q + 128` of row `r`, of the
  next 32 of row `r + 8`.

Needs `out % 16 == 0` and `in % 4 == 0`. Pure torch (element-wise passes and gathers, any device), no checks:
`interop.qweight.QuantizedWeight` validates the codes and decides where the layout is used.
"""

from __future__ import annotations

import torch

__all__ = ["PANEL_ROWS", "from_panels", "panel_code_tiles", "panel_rows", "to_panels"]

PANEL_ROWS = 16  # rows per panel (interop/csrc/duquant_kernels.c)


def to_panels(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: (out, in) int8, out % 16 == 0, in % 4 == 0 -> panels (module docstring): (out, in/2) uint8 for
    bits <= 4, (out, in) uint8 for 5..8."""
    out, n = codes.shape
    if bits > 4:
        u = (codes.to(torch.int16) + 128).to(torch.uint8).view(out // PANEL_ROWS, 2, PANEL_ROWS // 2, n // 4, 4)
        return u.permute(0, 3, 1, 2, 4).contiguous().view(out, n)  # (p, step, half, r, c)
    u = (codes + 8).to(torch.uint8).view(out // PANEL_ROWS, 2, PANEL_ROWS // 2, n // 4, 4)  # (p, half, r, step, c)
    return (u[:, 0] | (u[:, 1] << 4)).permute(0, 2, 1, 3).contiguous().view(out, n // 2)


def panel_code_tiles(packed: torch.Tensor, bits: int, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 (whole panels) of a panels weight -> (in, r1 - r0) rows in natural order: uint8 `Q + 8` for
    bits <= 4, int8 `Q` for 5..8."""
    n, rows = (packed.shape[1] if bits > 4 else packed.shape[1] * 2), r1 - r0
    if bits > 4:
        byte = packed[r0:r1].reshape(rows // PANEL_ROWS, n // 4, 2, PANEL_ROWS // 2, 4)  # (p, step, half, r, c)
        return (byte ^ 0x80).view(torch.int8).permute(1, 4, 0, 2, 3).reshape(n, rows)  # Q + 128 with its top bit flipped: Q
    byte = packed[r0:r1].reshape(rows // PANEL_ROWS, n // 4, PANEL_ROWS // 2, 4)  # (p, step, r, c)
    u = torch.stack((byte & 0xF, byte >> 4), dim=2)  # (p, step, half, r, c)
    return u.permute(1, 4, 0, 2, 3).reshape(n, rows)


def from_panels(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `to_panels`: -> (out, in) int8 codes."""
    tiles = panel_code_tiles(packed, bits, 0, packed.shape[0]).t()
    return (tiles if bits > 4 else tiles.to(torch.int8) - 8).contiguous()


def panel_rows(packed: torch.Tensor, bits: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids (T,)` of a panels weight -> (T, in) int8 codes, gathered byte by byte."""
    n = packed.shape[1] if bits > 4 else packed.shape[1] * 2
    ids = ids.long()
    cols = torch.arange(n, device=packed.device)[None, :]
    p, half, r = (ids // PANEL_ROWS)[:, None], ((ids % PANEL_ROWS) // 8)[:, None], (ids % 8)[:, None]
    step, c = cols // 4, cols % 4
    if bits > 4:
        byte = packed.reshape(-1)[p * (PANEL_ROWS * n) + step * 64 + half * 32 + r * 4 + c]
        return (byte ^ 0x80).view(torch.int8).contiguous()
    byte = packed.reshape(-1)[p * (PANEL_ROWS * n // 2) + step * 32 + r * 4 + c]
    return (torch.where(half == 1, byte >> 4, byte & 0xF).to(torch.int8) - 8).contiguous()
