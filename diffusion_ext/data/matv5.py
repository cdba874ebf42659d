"""A minimal reader of MATLAB v5 .mat files: the numeric matrices only (enough for NYU's splits.mat).

MATLAB saves small files in the v5 format unless told `-v7.3` (which is HDF5, read with h5py instead).
Layout (MathWorks, "MAT-File Format", 2019, ch. 1): a 128-byte header ending in the version 0x0100 and the
endian mark "IM"/"MI", then data elements, each an 8-byte tag (type, byte count) — or a 4-byte "small
element" tag with up to 4 bytes of data — padded to 8 bytes. Type 15 (miCOMPRESSED) is a zlib stream
holding one element; type 14 (miMATRIX) holds array flags, dimensions, a name and the real part.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

_NUMERIC = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
MI_MATRIX, MI_COMPRESSED = 14, 15


def _elements(buf: bytes, endian: str):
    """Yield (type, payload) of the data elements in buf."""
    pos = 0
    while pos + 8 <= len(buf):
        typ, nbytes = struct.unpack_from(endian + "II", buf, pos)
        if typ >> 16:   # small data element: 2-byte count, 2-byte type, 4 bytes of data
            typ, nbytes = typ & 0xFFFF, typ >> 16
            yield typ, buf[pos + 4:pos + 4 + nbytes]
            pos += 8
            continue
        payload = buf[pos + 8:pos + 8 + nbytes]
        if len(payload) < nbytes:
            raise ValueError(f"read_mat_v5: element of type {typ} runs past the end of the data")
        yield typ, payload
        pos += 8 + nbytes + (-nbytes % 8 if typ != MI_COMPRESSED else 0)


def _matrix(payload: bytes, endian: str):
    """(name, array) of a numeric miMATRIX, or None for other classes (cells, structs, chars...)."""
    parts = list(_elements(payload, endian))
    if len(parts) < 4:
        return None
    dims = np.frombuffer(parts[1][1], dtype=endian + "i4")
    name = parts[2][1].decode("ascii", "replace")
    typ, data = parts[3]
    if typ not in _NUMERIC:
        return None
    values = np.frombuffer(data, dtype=endian + _NUMERIC[typ])
    if values.size != int(np.prod(dims)):
        return None
    return name, values.reshape(tuple(dims), order="F")


def read_mat_v5(path) -> dict[str, np.ndarray]:
    """The numeric variables of a v5 .mat file as {name: array} (MATLAB's shapes, column-major order)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 128 or raw[126:128] not in (b"IM", b"MI"):
        raise ValueError(f"read_mat_v5: {str(path)!r} is not a MATLAB v5 .mat file (no 'IM'/'MI' endian mark)")
    endian = "<" if raw[126:128] == b"IM" else ">"
    out = {}
    for typ, payload in _elements(raw[128:], endian):
        if typ == MI_COMPRESSED:
            for typ2, payload2 in _elements(zlib.decompress(payload), endian):
                if typ2 == MI_MATRIX and (m := _matrix(payload2, endian)):
                    out[m[0]] = m[1]
        elif typ == MI_MATRIX and (m := _matrix(payload, endian)):
            out[m[0]] = m[1]
    return out
