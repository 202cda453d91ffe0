"""CRC-32C (Castagnoli), which Cloud KMS uses for its request and response integrity fields.

The inputs are a 32-byte digest, a 72-byte signature, a ~180-byte PEM: a table-driven
loop in Python is fast enough and spares a native dependency (google-crc32c).
"""

from __future__ import annotations

__all__ = ["crc32c"]

_POLY = 0x82F63B78  # the Castagnoli polynomial 0x1EDC6F41, bit-reversed


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
