"""Reading user-supplied folders safely: paths stay inside the folder, only regular files
are opened, JSON is read with a size limit.

A model or checkpoint folder may come from someone else, so the names written inside it
(``model_index.json`` keys, a shard index, ``COMPLETE.json``) are untrusted: ``"../../x"`` or
an absolute path must not make us read (or hash) a file elsewhere, and a FIFO or device
where a file should be would block a reader forever.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
from typing import Union

__all__ = ["inside", "regular_file", "read_json", "MAX_JSON_BYTES"]

PathLike = Union[str, os.PathLike]

# Configs, indexes and markers are kilobytes; a sharded index of a 20B model is < 2 MB.
MAX_JSON_BYTES = 64 << 20


def _cache_blobs(real_root: pathlib.Path):
    """The ``blobs`` folder of a Hugging Face cache repo when `real_root` lies in one of its
    ``snapshots/<revision>`` folders (files there are symlinks into ``blobs``), else None."""
    parts = real_root.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots":
            repo = pathlib.Path(*parts[:i])
            return repo / "blobs"
    return None


def _within(path: pathlib.Path, root: pathlib.Path) -> bool:
    return path == root or root in path.parents


def inside(root: PathLike, rel: PathLike, what: str = "") -> pathlib.Path:
    """``root / rel``, refusing (ValueError) a `rel` that is absolute, climbs out with ``..``,
    or is a symlink leading out of `root` (except into the ``blobs`` of the Hugging Face
    cache repo that `root` is a snapshot of)."""
    root_p = pathlib.Path(root)
    label = f"{what}: " if what else ""
    rel_s = os.fspath(rel) if isinstance(rel, (str, os.PathLike)) else None
    if not isinstance(rel_s, str) or not rel_s or "\x00" in rel_s:
        raise ValueError(f"{label}invalid file name {rel!r} in {root_p}")
    if os.path.isabs(rel_s) or os.path.normpath(rel_s).split(os.sep)[0] == "..":
        raise ValueError(f"{label}{rel_s!r} points outside {root_p}; refusing to read it")
    path = root_p / rel_s
    real_root = pathlib.Path(os.path.realpath(root_p))
    real = pathlib.Path(os.path.realpath(path))
    if not _within(real, real_root):
        blobs = _cache_blobs(real_root)
        if blobs is None or not _within(real, blobs):
            raise ValueError(f"{label}{rel_s!r} in {root_p} resolves to {real}, outside the folder; "
                             "refusing to read it")
    return path


def regular_file(path: PathLike, what: str = "") -> pathlib.Path:
    """`path` when it is a regular file (after symlinks); FileNotFoundError when missing,
    ValueError for a folder, FIFO, socket or device (reading those blocks or never ends)."""
    p = pathlib.Path(path)
    label = f"{what}: " if what else ""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}{p}: no such file") from None
    except OSError as e:
        raise ValueError(f"{label}{p}: cannot read it ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device or other special file")
        raise ValueError(f"{label}{p}: is {kind}, not a regular file; refusing to read it")
    return p


def read_json(path: PathLike, what: str = "", max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a regular file of at most `max_bytes`; ValueError naming the file
    otherwise (FileNotFoundError when missing)."""
    p = regular_file(path, what)
    label = f"{what}: " if what else ""
    try:
        with open(p, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise ValueError(f"{label}{p}: cannot read it ({e.strerror or e})") from e
    if len(raw) > max_bytes:
        raise ValueError(f"{label}{p}: larger than {max_bytes} bytes; not a config file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{label}{p}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{label}{p}: expected a JSON object, got {type(data).__name__}")
    return data
