"""Files that a resume reads are written atomically: a temporary file beside the target, fsync, rename.

A kill at any instant leaves either the old file or the new one, never a file cut mid-line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def fsync_file(path: str | Path) -> None:
    """Flush a file written by another library (``torch.save``) to disk before it is renamed into place."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:  # the rename itself is durable only once the directory is synced (not possible on every OS)
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
