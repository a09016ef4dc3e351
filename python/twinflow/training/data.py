"""Training data: a parquet file of (text, image_bytes) rows or a folder of images + captions
(video families: clips, as folders of frames, and images as 1-frame clips: ``ClipFolderDataset``);
for image-free training (``twinflow.use_image_free``) prompts only: a parquet with just the
caption column, or a .txt file with one prompt per line.

Images are decoded with PIL, resized (shorter side) and center-cropped to the resolution,
as [-1, 1] tensors. A parquet file may instead (or also) hold precomputed columns, each a
safetensors blob per row: ``latents`` (one tensor ``latents`` [C, h, w]) and ``text_embeds``
(the model's text tensors by name, e.g. ``prompt_embeds``, ``pooled_prompt_embeds``); then the
VAE / text encoders are not needed for training. ``tensor_bytes``/``tensors_from_bytes`` write
and read those blobs. Sharding across ranks: ``DistributedSampler``.

Editing families (``reference=True``) train on (reference image, target image, caption) triples:
an image folder holding ``<name>.png`` (the target), ``<name>_ref.png`` (the reference, any
image suffix) and ``<name>.txt``; or a parquet file with a reference image column beside the
target's (``data.reference_column``, default ``reference_bytes``). The reference gets the
target's resize and center crop, so the two stay aligned. Precomputed columns are refused for
them (the text encoding of Qwen-Image-Edit reads the reference image), and so is a prompts file.
"""

from __future__ import annotations

import io
import json
import pathlib
import re
from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")
LATENTS, TEXT_EMBEDS = "latents", "text_embeds"
#: an editing dataset's row: the reference image's pixels (besides the target's ``pixel_values``)
REFERENCE = "reference_values"
#: a folder dataset's reference image of ``<name>.png``: ``<name>_ref.<suffix>``
REF_SUFFIX = "_ref"


def tensor_bytes(tensors: Dict[str, torch.Tensor]) -> bytes:
    """A safetensors blob of named tensors (a precomputed parquet cell)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def tensors_from_bytes(blob: bytes) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(bytes(blob))


def load_image(data, resolution: int) -> torch.Tensor:
    """Decode (bytes or a path), resize the shorter side to `resolution`, center-crop;
    float32 [3, resolution, resolution] in [-1, 1]."""
    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
    img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div_(127.5).sub_(1.0)


class ParquetDataset(Dataset):
    """Rows of a parquet file, read one row group at a time (the last one is cached)."""

    def __init__(self, path, resolution: int, caption_column: str = "text", image_column: str = "image_bytes",
                 reference_column: Optional[str] = None):
        import pyarrow.parquet as pq

        self.path, self.resolution = str(path), resolution
        self.file = pq.ParquetFile(self.path)
        names = set(self.file.schema_arrow.names)
        if reference_column is not None:  # an editing family: raw (reference, target, caption) rows
            pre = sorted(names & {LATENTS, TEXT_EMBEDS})
            if pre:
                raise ValueError(f"{path}: precomputed {pre} columns: an editing family trains on raw images (its "
                                 "text encoding reads the reference image); give the reference, target and caption "
                                 "columns")
            missing = [f"{what} column {col!r} (data.{what}_column)" for what, col in
                       (("reference", reference_column), ("image", image_column), ("caption", caption_column))
                       if col not in names]
            if missing:
                raise ValueError(f"{path}: an editing family trains on (reference, target, caption) rows; missing "
                                 f"{', '.join(missing)}; has {sorted(names)}")
        self.columns = {} if reference_column is None else {"reference": reference_column}
        # field → column: precomputed when present, else the raw one
        for field, raw, what in ((LATENTS, image_column, "image"), (TEXT_EMBEDS, caption_column, "caption")):
            if field in names:
                self.columns[field] = field
            elif raw in names:
                self.columns["image" if field == LATENTS else "text"] = raw
            elif field == LATENTS:  # prompts only (image-free training)
                continue
            else:
                raise ValueError(f"{path}: needs {what} column {raw!r} (data.{what}_column) or a precomputed "
                                 f"{field!r} column; has {sorted(names)}")
        self._starts: List[int] = []
        n = 0
        for i in range(self.file.num_row_groups):
            self._starts.append(n)
            n += self.file.metadata.row_group(i).num_rows
        self._len = n
        self._cached = (-1, None)

    def __len__(self) -> int:
        return self._len

    def _row(self, index: int) -> dict:
        import bisect

        g = bisect.bisect_right(self._starts, index) - 1
        if self._cached[0] != g:
            self._cached = (g, self.file.read_row_group(g, columns=list(self.columns.values())).to_pydict())
        rows = self._cached[1]
        return {k: rows[col][index - self._starts[g]] for k, col in self.columns.items()}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._len:
            raise IndexError(index)
        row = self._row(index)
        out = {}
        if "reference" in row:
            out[REFERENCE] = load_image(row["reference"], self.resolution)
        if LATENTS in row:
            out[LATENTS] = tensors_from_bytes(row[LATENTS])[LATENTS]
        elif "image" in row:
            out["pixel_values"] = load_image(row["image"], self.resolution)
        if TEXT_EMBEDS in row:
            out[TEXT_EMBEDS] = tensors_from_bytes(row[TEXT_EMBEDS])
        else:
            out["text"] = row["text"] or ""
        return out

    def __getstate__(self):  # DataLoader workers reopen the file
        return {"path": self.path, "resolution": self.resolution, "columns": self.columns,
                "_starts": self._starts, "_len": self._len}

    def __setstate__(self, state):
        import pyarrow.parquet as pq

        self.__dict__.update(state)
        self.file = pq.ParquetFile(self.path)
        self._cached = (-1, None)


class ClipFolderDataset(Dataset):
    """Video families: clips and images in a folder (recursively). A clip is a folder of frame
    images (in name order) with its caption in a .txt of the folder's name beside it
    (``clips/walk/0001.png …`` + ``clips/walk.txt``); it gives `num_frames` frames from its
    start, every `frame_stride`-th, as [3, num_frames, R, R]. An image outside clip folders,
    captioned like in ``FolderDataset``, is a 1-frame clip [3, 1, R, R] — so with
    ``num_frames`` > 1 images are refused (a batch holds clips of one length). Video files
    need a video reader, which is not installed: they are refused, naming them."""

    def __init__(self, path, resolution: int, num_frames: int, frame_stride: int = 1):
        root = pathlib.Path(path)
        self.resolution, self.num_frames, self.stride = resolution, num_frames, frame_stride
        folders = sorted(p for p in root.rglob("*") if p.is_dir() and _caption(p).is_file())
        self.clips = [(p, sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)) for p in folders]
        inside = set(folders)
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                        and not inside.intersection(p.parents))
        videos = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        if videos:
            raise ValueError(f"{root}: video files ({videos[0].name}, ...) need a video reader (imageio or av), which "
                             "is not installed: extract each clip's frames into a folder (frames as images, the "
                             "caption in <folder>.txt beside it)")
        need = 1 + (num_frames - 1) * frame_stride
        for clip, frames in self.clips:
            if len(frames) < need:
                raise ValueError(f"{clip}: {len(frames)} frames, fewer than the {need} that data.num_frames = "
                                 f"{num_frames} at data.frame_stride = {frame_stride} takes")
        if images and num_frames > 1:
            raise ValueError(f"{root}: {len(images)} images (e.g. {images[0]}), which are 1-frame clips, while "
                             f"data.num_frames = {num_frames}: a batch holds clips of one length; train on images "
                             "with data.num_frames: 1, or keep them out of this folder")
        missing = [p for p in images if not _caption(p).is_file()]
        if missing:
            raise ValueError(f"{root}: {len(missing)} images without a caption file, e.g. {_caption(missing[0])}")
        self.items = [(p, frames[:need:frame_stride]) for p, frames in self.clips] + [(p, [p]) for p in images]
        if not self.items:
            raise ValueError(f"{root}: no clips (folders of frames with a <folder>.txt caption beside them) and no "
                             f"images ({', '.join(IMAGE_SUFFIXES)}) found")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        p, frames = self.items[index]
        return {"pixel_values": torch.stack([load_image(f, self.resolution) for f in frames], dim=1),
                "text": _caption(p).read_text().strip()}


def _caption(p: pathlib.Path) -> pathlib.Path:
    """The caption file of an image (same stem) or of a clip folder (its name + .txt beside it)."""
    return p.parent / (p.name + ".txt") if p.is_dir() else p.with_suffix(".txt")


class FolderDataset(Dataset):
    """Images in a folder (recursively), each with a caption in a .txt file of the same stem;
    with `reference` (editing families) each target ``<name>.*`` also has ``<name>_ref.*``."""

    def __init__(self, path, resolution: int, reference: bool = False):
        root = pathlib.Path(path)
        self.resolution = resolution
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        refs = {p for p in found if p.stem.endswith(REF_SUFFIX) and _reference_target(p, found) is not None}
        self.images = [p for p in found if p not in refs] if reference else found
        if not self.images:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        self.references: List[pathlib.Path] = []
        if reference:
            by_target = {_reference_target(r, found): r for r in refs}
            lacking = [p for p in self.images if p not in by_target]
            if lacking:
                raise ValueError(f"{root}: an editing family trains on (reference, target, caption) triples; "
                                 f"{len(lacking)} images have no reference image, e.g. {lacking[0].name} needs "
                                 f"{lacking[0].stem}{REF_SUFFIX}{lacking[0].suffix} beside it")
            self.references = [by_target[p] for p in self.images]
        elif refs and any(not r.with_suffix(".txt").is_file() for r in refs):
            r = sorted(refs)[0]
            raise ValueError(f"{root}: editing data ({r.name} is the reference image of {r.stem[:-len(REF_SUFFIX)]}.*), "
                             "but the model is not an editing family: train qwen-image-edit, qwen-image-edit-plus "
                             "or flux-kontext on it")
        missing = [p for p in self.images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise ValueError(f"{root}: {len(missing)} images without a caption file, e.g. "
                             f"{missing[0].with_suffix('.txt')}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        p = self.images[index]
        out = {"pixel_values": load_image(p, self.resolution), "text": p.with_suffix(".txt").read_text().strip()}
        if self.references:
            out[REFERENCE] = load_image(self.references[index], self.resolution)
        return out


def _reference_target(ref: pathlib.Path, images: List[pathlib.Path]) -> Optional[pathlib.Path]:
    """The target image ``<name>.*`` of a reference ``<name>_ref.*`` among `images`, or None."""
    stem = ref.stem[:-len(REF_SUFFIX)]
    return next((p for p in images if p.parent == ref.parent and p.stem == stem), None) if stem else None


# A prompts file is checked on its first lines: one that is really something else (JSON lines,
# a table, a requirements or config file, a document) must not train silently as prompts.
_CHECKED_LINES = 20
_MAX_PROMPT_CHARS = 2000
_SPEC_LINE = re.compile(r"^[\w.\-\[\]]+\s*(==|>=|<=|~=|!=|=)\s*\S+$")


def _check_prompts(path, lines) -> None:
    """ValueError naming the first line that shows the file is not one prompt per line."""
    def refuse(n, why):
        raise ValueError(f"{path}: line {n} does not look like a prompt ({why}); a prompts file has one "
                         "prompt per line (captions with images: an image folder or a parquet)")

    for n, line in enumerate(lines, 1):
        if len(line) > _MAX_PROMPT_CHARS:
            refuse(n, f"{len(line)} characters")
        if any(ord(ch) < 32 and ch != "\t" for ch in line):
            refuse(n, "control characters: not text")
        if line[0] in "{[":
            try:
                json.loads(line)
            except ValueError:
                pass
            else:
                refuse(n, "a JSON value")
    if len(lines) >= 2 and all("\t" in line for line in lines) and len({line.count("\t") for line in lines}) == 1:
        refuse(1, "tab-separated columns: a table")
    specs = [n for n, line in enumerate(lines, 1) if _SPEC_LINE.match(line)]
    if len(specs) * 2 > len(lines):
        refuse(specs[0], "name=value or a package pin: a config or requirements file")


class PromptsDataset(Dataset):
    """A text file with one prompt per line (blank lines skipped): image-free training."""

    def __init__(self, path):
        try:
            lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the prompts file ({e})") from e
        self.prompts = [line.strip() for line in lines if line.strip()]
        if not self.prompts:
            raise ValueError(f"{path}: no prompts (one per line expected)")
        _check_prompts(path, self.prompts[:_CHECKED_LINES])

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"text": self.prompts[index]}


def open_dataset(path, cfg, video: bool = False, reference: bool = False) -> Dataset:
    """A parquet file, an image folder or a prompts .txt file, per `cfg` (a DataConfig). A
    parquet without an image column, like the .txt file, gives prompts only (image-free training).
    `video` (a video family): a folder holds clips and images (``ClipFolderDataset``); a
    parquet's images are 1-frame clips, its precomputed latents [C, F, h, w]. `reference` (an
    editing family): rows are (reference, target, caption) triples (module doc)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"--dataset-path: {path} does not exist (expected a .parquet file, an image folder or a "
                         "prompts .txt file)")
    if p.is_dir():
        if video:
            return ClipFolderDataset(p, cfg.resolution, cfg.num_frames, cfg.frame_stride)
        return FolderDataset(p, cfg.resolution, reference=reference)
    if p.is_file() and p.suffix == ".parquet":
        data = ParquetDataset(p, cfg.resolution, cfg.caption_column, cfg.image_column,
                              cfg.reference_column if reference else None)
        if video and cfg.num_frames > 1 and "image" in data.columns:
            raise ValueError(f"{path}: its images are 1-frame clips, while data.num_frames = {cfg.num_frames}: use "
                             "data.num_frames: 1, a clip folder, or precomputed latents [C, F, h, w]")
        return data
    if p.is_file() and p.suffix == ".txt":
        if reference:
            raise ValueError(f"--dataset-path: {path} is a prompts file, but an editing family trains on (reference, "
                             "target, caption) triples: an image folder (<name>.png, <name>_ref.png, <name>.txt) or "
                             "a parquet with a reference column")
        return PromptsDataset(p)
    raise ValueError(f"--dataset-path: expected a .parquet file, an image folder or a prompts .txt file, got {path}")


def pad_stack(items: List[torch.Tensor]) -> torch.Tensor:
    """Stack on a new batch dim, zero-padding dim 0 (the sequence) to the longest item."""
    n = max(t.shape[0] for t in items) if items[0].dim() else 0
    if all(t.shape == items[0].shape for t in items):
        return torch.stack(items)
    out = items[0].new_zeros((len(items), n, *items[0].shape[1:]))
    for i, t in enumerate(items):
        out[i, : t.shape[0]] = t
    return out


def collate(rows: List[dict]) -> dict:
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        if key == "text":
            out[key] = vals
        elif key == TEXT_EMBEDS:
            out[key] = {k: pad_stack([v[k] for v in vals]) for k in vals[0]}
        else:
            out[key] = torch.stack(vals)
    return out


class ResumableSampler(Sampler):
    """A DistributedSampler whose epoch can start after `skip` indices (resume mid-epoch
    without decoding the batches already trained on)."""

    def __init__(self, dataset, *, world: int, rank: int, shuffle: bool, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                        seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.inner)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def make_loader(dataset, *, batch_size: int, world: int, rank: int, shuffle: bool, seed: int,
                num_workers: int) -> DataLoader:
    if len(dataset) < batch_size * world:
        raise ValueError(f"the dataset has {len(dataset)} rows, fewer than one global micro-batch "
                         f"(training.batch_size {batch_size} × {world} processes)")
    sampler = ResumableSampler(dataset, world=world, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, drop_last=True, persistent_workers=False)


def load_null_embeds(path: Optional[str]) -> Optional[Dict[str, torch.Tensor]]:
    if path is None:
        return None
    from safetensors.torch import load_file

    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"data.null_text_embeds: no such file: {p}")
    return load_file(str(p))
