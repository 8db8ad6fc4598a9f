"""Block sizes of the rotation families that use one matrix shared by every block."""

from __future__ import annotations


def largest_power_of_two_block(n: int, limit: int) -> int:
    """The largest power of two `b <= limit` that divides `n` (1 when `n` is odd)."""
    b = 1
    while b * 2 <= limit and n % (b * 2) == 0:
        b *= 2
    return b


def largest_divisor_block(n: int, limit: int) -> int:
    """The largest `b <= limit` that divides `n`."""
    for b in range(min(limit, n), 0, -1):
        if n % b == 0:
            return b
    return 1
