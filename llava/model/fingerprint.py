"""A cheap fingerprint of the weights in a checkpoint folder, so that answers made by one
model are never resumed with another that was trained into the same folder.

Reading 14 GB to hash it would cost minutes; instead every weight file contributes its
name, its size, its safetensors header (names, dtypes, shapes, offsets) and a sample of its
bytes (the first and last 64 KiB and 14 evenly spaced 4 KiB blocks). Retraining changes
the values, hence the sampled bytes; copying a folder does not change the fingerprint.
Small files (configs, adapters under 1 MiB) are hashed whole.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["WEIGHT_SUFFIXES", "weights_fingerprint"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CONFIGS = ("config.json", "adapter_config.json")
_WHOLE_BELOW = 1 << 20
_EDGE, _BLOCK, _BLOCKS = 64 << 10, 4 << 10, 14


def _file_digest(path: str, digest) -> None:
    size = os.path.getsize(path)
    digest.update(f"{os.path.basename(path)}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= _WHOLE_BELOW:
            digest.update(f.read())
            return
        if path.endswith(".safetensors"):
            header_length = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_length, size - 8)))
        offsets = [0, size - _EDGE] + [size * (i + 1) // (_BLOCKS + 1) for i in range(_BLOCKS)]
        for offset in offsets:
            f.seek(offset)
            digest.update(f.read(_EDGE if offset in (0, size - _EDGE) else _BLOCK))


def weights_fingerprint(folder: str) -> str:
    """Hex digest over the weight files and configs directly in ``folder`` (sorted by name)."""
    digest = hashlib.sha256()
    names = sorted(
        name for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name)) and (name.endswith(WEIGHT_SUFFIXES) or name in _CONFIGS)
    )
    for name in names:
        _file_digest(os.path.join(folder, name), digest)
    return digest.hexdigest()[:32]
