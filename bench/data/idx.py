"""A minimal reader for IDX files, the format of MNIST and Fashion-MNIST.

Fashion-MNIST reaches these machines as the Debian package ``dataset-fashion-mnist`` (gzipped
IDX under ``/usr/share/datasets/fashion-mnist``), which torchvision's class will not read from
there; reading IDX is a dozen lines. Layout (http://yann.lecun.com/exdb/mnist/): two zero
bytes, a type byte (0x08 = unsigned byte, the only one these datasets use), the number of
dimensions, each dimension as a big-endian uint32, then the data in row-major order.
"""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (possibly ``.gz``) unsigned-byte IDX file; ``ValueError`` naming the file if the
    header or the size is wrong."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = bytearray(f.read())  # writable, so torch.from_numpy needs no copy
    except (OSError, EOFError) as err:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise ValueError(f"{path}: unreadable ({err})") from err
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != UBYTE:
        magic = raw[:4].hex() or "missing"
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + math.prod(shape):
        raise ValueError(
            f"{path}: header promises shape {shape} ({math.prod(shape)} bytes), "
            f"file holds {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
