"""``twinflow train`` for the editing families, on (reference, target, caption) triples
(twinflow.training.data; configs/qwen_image_edit_*_1order.yaml, configs/flux_kontext_*_1order.yaml):

1. one TwinFlow step through the trainer (its data, text encoder, VAE and model call), full
   fine-tuning and LoRA: the cond list ends with the reference latents (the posterior mode of
   the batch's reference images, the same tensor in the unconditional branch; Qwen-Image-Edit
   reads the reference in its unconditional text too), the loss is finite, and the gradients
   reach the aux embedder (full) or only the adapter, the time embedder's included (LoRA);
2. ``twinflow train`` end to end (FLUX Kontext, LoRA, one step): the exported pipeline loads as
   the stock FluxKontextPipeline and edits an image;
3. the data: an image folder (``<name>_ref.png``) or a parquet with a reference column, both
   cropped like their target; an editing family given data without references, a prompts file,
   precomputed columns or data.null_text_embeds, and a text-to-image family given editing data,
   are clear errors.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
import torch

import tiny_pipelines
from checks import expect_error
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)
from twinflow import diffusers_patch, load_pipeline
from twinflow.training.config import DataConfig, load_config
from twinflow.training.data import REFERENCE, load_image, open_dataset

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
CONFIG = {"qwen-image-edit": "qwen_image_edit", "qwen-image-edit-plus": "qwen_image_edit",
          "flux-kontext": "flux_kontext"}
SIZE = 32
SPEED = ["lora.rank=4", "lora.alpha=4", "training.batch_size=4", 'training.mixed_precision="no"',
         "training.gradient_checkpointing=false", f"data.resolution={SIZE}", "data.num_workers=0",
         "data.shuffle=false", "training.max_steps=1", "training.sample_every=1000", "training.checkpoint_every=1000"]


def _image(seed, size=(SIZE + 8, SIZE)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def edit_folder(root: pathlib.Path, rows: int = 4, references: bool = True) -> pathlib.Path:
    """<name>.png (target), <name>_ref.png (reference), <name>.txt (caption); odd sizes, so that
    both are resized and center-cropped."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        _image(i).save(root / f"pair{i}.png")
        if references:
            _image(100 + i).save(root / f"pair{i}_ref.png")
        (root / f"pair{i}.txt").write_text(f"make picture {i} brighter")
    return root


def _config(model, kind, folder):
    return load_config(CONFIGS / f"{CONFIG[model]}_{kind}_1order.yaml",
                       [f"model.name={model}", f"model.pretrained_model_name_or_path={folder}", *SPEED])


def _trainer(model, kind, tmp_path):
    from twinflow.training.distributed import Dist
    from twinflow.training.trainer import Trainer

    tiny_pipelines.needs_pipeline(model)
    cfg = _config(model, kind, tiny_pipelines.saved_pipeline(model, "stock"))
    return Trainer(cfg, dataset_path=edit_folder(tmp_path / "data"), output_dir=tmp_path / "out", d=Dist(),
                   progress=False)


@pytest.mark.parametrize("model,kind", [("qwen-image-edit", "full"), ("qwen-image-edit", "lora"),
                                        ("qwen-image-edit-plus", "full"), ("flux-kontext", "full"),
                                        ("flux-kontext", "lora")])
def test_one_training_step_conditions_on_the_reference(model, kind, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stock base: the aux embedder starts as published (warned)
        trainer = _trainer(model, kind, tmp_path)
    try:
        family = trainer.family
        batch = next(trainer.micro_batches())
        x, cond, uncond = trainer._batch(batch, 0, 0)
        assert len(cond) == len(uncond) == len(family.text_keys) + 1
        ref = cond[-1]
        assert uncond[-1] is ref and ref.shape[:2] == x.shape[:2]
        with torch.no_grad():
            want = family.encode_latents(trainer.vae, batch[REFERENCE], None)
        assert torch.equal(ref, want.float()), "the reference latents: posterior mode, not noised"
        if model.startswith("qwen"):  # the unconditional text reads the reference image too
            flipped = batch[REFERENCE].flip(-1)
            other = trainer.text_encoder(list(family.null_texts) * len(flipped), references=flipped)
            assert not torch.allclose(other["prompt_embeds"], uncond[0])
        loss = trainer.loss_fn(trainer.model, x, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(1))
        loss.backward()
        assert torch.isfinite(loss)
        named = dict(trainer.raw.transformer.named_parameters())
        if kind == "full":
            aux = [p for n, p in named.items() if n.startswith(family.aux_prefix)]
            assert aux and all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux)
        else:
            trained = {n: p for n, p in named.items() if p.requires_grad}
            assert trained and all("lora_" in n for n in trained)
            emb = [p for n, p in trained.items() if "timestep_embedder" in n and ".lora_B." in n]
            assert emb and all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb)
    finally:
        trainer.close()


def test_twinflow_train_exports_an_editing_pipeline(tmp_path):
    from twinflow.cli import main

    model = "flux-kontext"
    cfg = CONFIGS / "flux_kontext_lora_1order.yaml"
    sets = [f"model.pretrained_model_name_or_path={tiny_pipelines.saved_pipeline(model, 'stock')}", *SPEED]
    argv = ["train", "--config", str(cfg), "--dataset-path", str(edit_folder(tmp_path / "data")),
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    pipe = load_pipeline(tmp_path / "out" / "pipeline")
    assert type(pipe).__name__ == "FluxKontextPipeline"
    assert pipe.config["_twinflow"] == {"format": 1, "backbone": model, "mode": "lora"}
    img = tiny_pipelines.generate_images(pipe, model)
    assert img.shape == (1, 3, SIZE, SIZE) and torch.isfinite(img).all()


# ----------------------------------------------------------------------------- data

def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_folder_and_parquet_triples_crop_reference_and_target_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = DataConfig(resolution=SIZE)
    folder = open_dataset(edit_folder(tmp_path / "data"), cfg, reference=True)
    assert len(folder) == 4  # the references are not training targets
    row = folder[1]
    assert set(row) == {"pixel_values", REFERENCE, "text"} and row["text"] == "make picture 1 brighter"
    assert torch.equal(row[REFERENCE], load_image(tmp_path / "data" / "pair1_ref.png", SIZE))
    rows = [{"text": f"t{i}", "image_bytes": _png(_image(i)), "reference_bytes": _png(_image(100 + i))}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "edit.parquet")
    parquet = open_dataset(tmp_path / "edit.parquet", cfg, reference=True)
    got = parquet[1]
    assert torch.equal(got[REFERENCE], row[REFERENCE]) and torch.equal(got["pixel_values"], row["pixel_values"])


def test_data_without_references_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = DataConfig(resolution=SIZE)
    plain = edit_folder(tmp_path / "plain", references=False)
    expect_error(ValueError, lambda: open_dataset(plain, cfg, reference=True),
                 contains=("editing family", "pair0_ref.png"))
    pq.write_table(pa.Table.from_pylist([{"text": "t", "image_bytes": _png(_image(0))}]), tmp_path / "t2i.parquet")
    expect_error(ValueError, lambda: open_dataset(tmp_path / "t2i.parquet", cfg, reference=True),
                 contains=("reference column 'reference_bytes'", "data.reference_column"))
    pq.write_table(pa.Table.from_pylist([{"latents": b"x", "text_embeds": b"y", "reference_bytes": b"z"}]),
                   tmp_path / "pre.parquet")
    expect_error(ValueError, lambda: open_dataset(tmp_path / "pre.parquet", cfg, reference=True),
                 contains=("precomputed", "raw images"))
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    expect_error(ValueError, lambda: open_dataset(tmp_path / "prompts.txt", cfg, reference=True),
                 contains=("prompts file", "_ref.png"))
    # editing data given to a text-to-image family: not trained on the references as targets
    edit = edit_folder(tmp_path / "edit")
    expect_error(ValueError, lambda: open_dataset(edit, cfg), contains=("editing data", "flux-kontext"))


def test_null_text_embeds_are_refused_for_an_editing_family(tmp_path):
    from twinflow.training.distributed import Dist
    from twinflow.training.trainer import Trainer

    cfg = _config("flux-kontext", "full", tmp_path / "unused")
    cfg.data.null_text_embeds = str(tmp_path / "null.safetensors")
    expect_error(ValueError, lambda: Trainer(cfg, dataset_path=tmp_path, output_dir=tmp_path / "out", d=Dist()),
                 contains=("data.null_text_embeds", "editing family"))
    assert diffusers_patch.backbone("flux-kontext").edit
