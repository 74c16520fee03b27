"""WebDataset shards for tests (helper module, no tests here): written by the converter, or member
by member with plain ``tarfile`` (the format, not only our writer's output)."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from engine import shard_writer
from reliability.faults import CreatesMarkerWhenUnpickled


def image_bytes(seed: int, size: tuple[int, int] = (40, 36), format: str = "JPEG") -> bytes:
    """A smooth random colour image, encoded."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR).save(buffer, format=format)
    return buffer.getvalue()


def write_tar(path: Path, members: Iterable[tuple[str, Optional[bytes]]]) -> Path:
    """A tar of ``(name, data)`` members in order (data None: a directory entry), with ``tarfile``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            if data is None:
                member.type = tarfile.DIRTYPE
                tar.addfile(member)
            else:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return path


def convert(source: Path, output: Path, *extra: str) -> str:
    """``python -m engine.shard_writer source output *extra``; returns the ``--data_path`` pattern."""
    shards = shard_writer.main([str(source), str(output), *extra])
    return shard_writer.data_path_of(shards)


def piped(pattern: str) -> str:
    """The same shards as a ``pipe:`` source (read as a remote stream)."""
    return f"pipe:cat {pattern}"


def unpickling_payload(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded."""
    return pickle.dumps(CreatesMarkerWhenUnpickled(marker))
