"""twinflow.training.data: decoding, resize + center-crop, parquet / folder datasets,
precomputed blobs, padding collate and rank sharding (no models; seconds)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image


from checks import expect_error  # noqa: E402
from twinflow.training.config import DataConfig  # noqa: E402
from twinflow.training.data import (ResumableSampler, collate, load_image, open_dataset, tensor_bytes,  # noqa: E402
                                    tensors_from_bytes)


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    return path


def test_resize_shorter_side_and_center_crop():
    # 16 wide × 96 tall, three horizontal bands black / grey / white: after resizing the width
    # to 8 (height 48) the centred 8×8 crop (rows 20-27) lies inside the grey band (rows 16-31).
    arr = np.zeros((96, 16, 3), dtype=np.uint8)
    arr[32:64] = 128
    arr[64:] = 255
    x = load_image(_png(arr), 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full((3, 8, 8), 128 / 127.5 - 1), atol=0.02, rtol=0)
    # grayscale / RGBA inputs become RGB in [-1, 1]
    y = load_image(_png(np.full((5, 9), 255, dtype=np.uint8)), 4)
    assert y.shape == (3, 4, 4) and torch.allclose(y, torch.ones_like(y))


def test_parquet_rows_and_precomputed(tmp_path):
    cfg = DataConfig(resolution=4)
    rows = [{"text": f"t{i}", "image_bytes": _png(np.full((6, 6, 3), i, dtype=np.uint8))} for i in range(7)]
    ds = open_dataset(_parquet(tmp_path / "a.parquet", rows), cfg)
    assert len(ds) == 7 and ds[5]["text"] == "t5" and ds[5]["pixel_values"].shape == (3, 4, 4)
    assert ds[6]["pixel_values"][0, 0, 0].item() == pytest.approx(6 / 127.5 - 1)
    blob = {"prompt_embeds": torch.randn(3, 2), "mask": torch.ones(3, dtype=torch.long)}
    assert all(torch.equal(v, tensors_from_bytes(tensor_bytes(blob))[k]) for k, v in blob.items())
    pre = [{"latents": tensor_bytes({"latents": torch.full((2, 2, 2), float(i))}),
            "text_embeds": tensor_bytes({"prompt_embeds": torch.ones(1 + i, 2)})} for i in range(4)]
    ds = open_dataset(_parquet(tmp_path / "p.parquet", pre), cfg)
    assert set(ds[3]) == {"latents", "text_embeds"} and ds[3]["latents"][0, 0, 0] == 3.0
    expect_error(ValueError, lambda: open_dataset(_parquet(tmp_path / "b.parquet", [{"caption": "x", "image_bytes": b""}]),
                                                  cfg), contains=("caption column 'text'", "data.caption_column"))
    expect_error(ValueError, lambda: open_dataset(tmp_path / "none.txt", cfg),
                 contains=("--dataset-path", "none.txt does not exist"))
    (tmp_path / "data.json").write_text("{}")
    expect_error(ValueError, lambda: open_dataset(tmp_path / "data.json", cfg),
                 contains=("--dataset-path: expected a .parquet file", "data.json"))


def test_folder_dataset(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((5, 7, 3), 10 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f" caption {i}\n")
    ds = open_dataset(tmp_path, DataConfig(resolution=4))
    assert len(ds) == 3 and ds[2]["text"] == "caption 2" and ds[2]["pixel_values"].shape == (3, 4, 4)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "sub.jpg")
    expect_error(ValueError, lambda: open_dataset(tmp_path, DataConfig(resolution=4)), contains="sub.txt")


def test_collate_pads_sequences():
    rows = [{"text_embeds": {"e": torch.ones(n, 2), "m": torch.ones(n, dtype=torch.long)}, "latents": torch.zeros(1)}
            for n in (2, 4)]
    b = collate(rows)
    assert b["text_embeds"]["e"].shape == (2, 4, 2) and b["text_embeds"]["m"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["latents"].shape == (2, 1)


def test_ranks_shard_the_data_and_resume_skips():
    data = list(range(10))
    shards = [list(ResumableSampler(data, world=2, rank=r, shuffle=True, seed=3)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == data
    s = ResumableSampler(data, world=2, rank=1, shuffle=True, seed=3)
    s.set_epoch(1)
    full = list(s)
    assert full != shards[1]  # a new order per epoch
    s.set_epoch(1, skip=2)
    assert list(s) == full[2:] and len(s) == 3


@pytest.mark.parametrize("text,why", [
    ('{"prompt": "a cat", "image": "1.png"}\n{"prompt": "a dog", "image": "2.png"}\n', "JSON"),
    ("1.png\ta cat\n2.png\ta dog\n3.png\ta bird\n", "tab-separated"),
    ("torch==2.13.0\nnumpy>=2\ndiffusers>=0.37.0\n", "requirements"),
    ("lr=1e-4\nbatch_size=4\nsteps=10\n", "config"),
    ("word " * 1000 + "\n", "characters"),
])
def test_a_text_file_that_is_not_prompts_is_refused(tmp_path, text, why):
    from twinflow.training.data import PromptsDataset

    path = tmp_path / "data.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"line 1 does not look like a prompt") as e:
        PromptsDataset(path)
    assert why in str(e.value) and "data.txt" in str(e.value)


def test_prompts_with_commas_equals_and_brackets_are_prompts(tmp_path):
    from twinflow.training.data import PromptsDataset

    path = tmp_path / "prompts.txt"
    path.write_text("a cat, sitting on a mat, photorealistic\n\n[style] a = b poster of a dog\n"
                    "a bird {watercolor}\n")
    assert PromptsDataset(path).prompts[0] == "a cat, sitting on a mat, photorealistic"
