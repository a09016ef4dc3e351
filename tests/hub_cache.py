"""A Hugging Face Hub cache laid out on disk, as huggingface_hub writes it, so that repo ids
resolve offline in tests (no download at run time)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib


def lay_out_repo(cache: pathlib.Path, repo_id: str, files: dict, revision: str = "main") -> str:
    """A Hub cache entry as huggingface_hub writes it: content-addressed blobs, a snapshot
    folder of symlinks named by the commit, and refs/<revision> holding that commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(json.dumps(sorted(files), default=str).encode() + revision.encode()).hexdigest()
    for rel, src in files.items():
        data = pathlib.Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit
