"""The editing families through their stock diffusers pipelines (QwenImageEditPipeline,
QwenImageEditPlusPipeline, FluxKontextPipeline) on the tiny saved folders of ``tiny_pipelines``:

1. ``load_pipeline`` gives the stock edit pipeline class with the TwinFlow scheduler; 2 steps
   with a reference image run through it, and the trainer's model call (``Backbone.call`` on
   ``encode_text`` with the reference and the reference latents) sampled with UnifiedSampler
   gives the same latents — the text the pipeline encodes is ``encode_text``'s, the reference
   latents ``encode_latents(..., None)``'s (the posterior mode); ``save_pretrained`` →
   ``load_pipeline`` gives the identical image;
2. ``twinflow generate --image`` is the reference for an editing family (PNG + JSON); without
   --image, or with --strength, it is a one-line error;
3. a checkpoint of one family loaded as another (FLUX / FLUX Kontext, Qwen-Image / its edit
   models: the same transformer classes) is a ValueError naming both.
Qwen-Image-Edit's pipelines need torchvision (their Qwen2VLProcessor): without it those cases
skip (``tiny_pipelines.needs_pipeline``) and FLUX Kontext's still run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_pipelines
from checks import expect_error
from tiny_pipelines import TEST_SIZE, one_thread, reference_image  # noqa: F401 (autouse fixture)
from twinflow import TwinFlowScheduler, UnifiedSampler, load_pipeline
from twinflow.cli import main
from twinflow.diffusers_patch import backbone
from twinflow.diffusers_patch._backbone import unpack_2x2
from twinflow.training.models import TwinFlowModel

EDIT = ("qwen-image-edit", "qwen-image-edit-plus", "flux-kontext")
#: deterministic few-step settings (tt = 0 ≠ t: the aux embedder is live)
SETTINGS = dict(stochast_ratio=0.0, rfba_gap_steps=(0.001, 0.6), sampling_style="few")
PROMPT = "make it blue"


class Inputs:
    """The keyword arguments of every transformer call (a forward pre-hook)."""

    def __init__(self, transformer):
        self.seen = []
        transformer.register_forward_pre_hook(lambda m, args, kw: self.seen.append(dict(kw)), with_kwargs=True)


def _generate(pipe, model, noise, image):
    pipe.set_progress_bar_config(disable=True)
    bb = backbone(model)
    with torch.no_grad():
        return pipe(prompt=PROMPT, num_inference_steps=2, height=TEST_SIZE, width=TEST_SIZE, output_type="latent",
                    latents=noise, **{bb.cfg_kwarg: 1.0}, **bb.exact_size_kwargs(TEST_SIZE, TEST_SIZE),
                    **tiny_pipelines.edit_kwargs(model, image=image)).images


def _reference_latents(bb, seen, latents_shape):
    """The reference latents [1, C, h', w'] of a recorded transformer call: the tokens after x's."""
    tokens = seen["hidden_states"]
    b, c, h, w = latents_shape
    ref = tokens[:, (h // 2) * (w // 2):]
    if "img_shapes" in seen:  # Qwen-Image: its img_shapes entry
        _, rh, rw = seen["img_shapes"][0][1]
    else:  # FLUX Kontext: the ids with first axis 1
        ids = seen["img_ids"][seen["img_ids"][:, 0] == 1]
        rh, rw = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    return unpack_2x2(ref, (b, c, 2 * rh, 2 * rw))


@pytest.mark.parametrize("model", EDIT)
def test_stock_edit_pipeline_matches_the_training_call_and_round_trips(model, tmp_path):
    tiny_pipelines.needs_pipeline(model)
    bb = backbone(model)
    pipe = load_pipeline(tiny_pipelines.saved_pipeline(model, "aux"), model)
    assert type(pipe).__name__ == bb.pipeline_class_name
    pipe.scheduler = TwinFlowScheduler(**SETTINGS)
    c = pipe.transformer.config.in_channels // 4
    side = TEST_SIZE // pipe.vae_scale_factor
    noise = torch.randn(1, c, side, side, generator=torch.Generator().manual_seed(0))
    packed = pipe._pack_latents(noise[:, None] if "qwen" in model else noise, 1, c, side, side)
    image = reference_image()
    calls = Inputs(pipe.transformer)
    stock = _generate(pipe, model, packed, image)
    assert len(calls.seen) == 2 and torch.isfinite(stock).all()

    # the trainer's call: encode_text with the reference, the reference latents last in cond
    with torch.no_grad():  # as the trainer encodes (TextEncoder)
        embeds = bb.encode_text(pipe, [PROMPT], torch.device("cpu"), references=[image])
    first = calls.seen[0]
    assert torch.equal(embeds["prompt_embeds"], first["encoder_hidden_states"])
    ref = _reference_latents(bb, first, noise.shape)
    net = TwinFlowModel(pipe.transformer, bb)
    with torch.no_grad():
        ours = UnifiedSampler(sampling_steps=2, **SETTINGS).sample(
            net, noise, cond=[embeds[k] for k in bb.text_keys] + [ref])
    ours = pipe._pack_latents(ours[:, None] if "qwen" in model else ours, 1, c, side, side)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)

    # the reference latents are the posterior mode, as the pipelines encode a reference
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        theirs = pipe._encode_vae_image(pixels[:, :, None] if "qwen" in model else pixels, generator=None)
        assert torch.equal(bb.encode_latents(pipe.vae, pixels, None), theirs[:, :, 0] if "qwen" in model else theirs)

    # save_pretrained → load_pipeline: the same pipeline class, the identical image
    pipe.save_pretrained(tmp_path)
    again = load_pipeline(tmp_path)
    assert type(again).__name__ == bb.pipeline_class_name and again.config["_twinflow"]["backbone"] == model
    again.scheduler = TwinFlowScheduler(**SETTINGS)
    assert torch.equal(_generate(again, model, packed, image), stock)


def test_the_reference_image_is_read():
    model = "flux-kontext"
    pipe = load_pipeline(tiny_pipelines.saved_pipeline(model, "aux"), model)
    c, side = pipe.transformer.config.in_channels // 4, TEST_SIZE // pipe.vae_scale_factor
    noise = pipe._pack_latents(torch.randn(1, c, side, side, generator=torch.Generator().manual_seed(0)),
                               1, c, side, side)
    a = _generate(pipe, model, noise, reference_image(seed=0))
    b = _generate(pipe, model, noise, reference_image(seed=1))
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-4)


def test_lora_mode_loads():
    model = "qwen-image-edit"
    tiny_pipelines.needs_pipeline(model)
    with pytest.warns(UserWarning, match="ignored in LoRA mode"):
        pipe = load_pipeline(tiny_pipelines.saved_pipeline(model, "aux"), model, mode="lora")
    assert type(pipe).__name__ == "QwenImageEditPipeline" and pipe.config["_twinflow"]["mode"] == "lora"
    assert not any(k.startswith(backbone(model).aux_prefix) for k in pipe.transformer.state_dict())


# ----------------------------------------------------------------------------- twinflow generate

def _argv(model, tmp_path, *extra):
    return ["generate", "--model", model, "--model-path", str(tiny_pipelines.saved_pipeline(model, "aux")),
            "--height", str(TEST_SIZE), "--width", str(TEST_SIZE), "--device", "cpu", "--steps", "2",
            "--prompt", PROMPT, "--output-dir", str(tmp_path / "out"), "--quiet", *extra]


def test_generate_edits_the_image_given_with_image(tmp_path):
    model = "qwen-image-edit"
    tiny_pipelines.needs_pipeline(model)
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    assert main(_argv(model, tmp_path, "--image", str(ref))) == 0
    rec = json.loads((tmp_path / "out" / "000-00.json").read_text())
    assert rec["model"] == model and rec["input_image"] == str(ref.resolve()) and rec["image_role"] == "reference"
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "out" / "000-00.png"))
    assert img.shape == (TEST_SIZE, TEST_SIZE, 3)


def test_generate_errors_for_an_editing_family(tmp_path, capsys):
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    for extra, words in (((), ("--image", "flux-kontext edits an input image")),
                         (("--image", str(ref), "--strength", "0.5"), ("--strength", "reference")),
                         (("--image", str(tmp_path / "missing.png")), ("--image", "missing.png"))):
        args = _argv("flux-kontext", tmp_path, *extra)  # the tiny folder is built (and logs) here
        capsys.readouterr()
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("twinflow generate: error: ") and all(w in err[-1] for w in words), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- one family as another

def test_a_checkpoint_of_one_family_is_refused_as_another():
    flux, kontext = tiny_pipelines.saved_pipeline("flux", "stock"), tiny_pipelines.saved_pipeline("flux-kontext", "stock")
    expect_error(ValueError, lambda: load_pipeline(flux, "flux-kontext"),
                 contains=("FluxPipeline", "flux-kontext", "model='flux'"))
    expect_error(ValueError, lambda: load_pipeline(kontext, "flux"),
                 contains=("FluxKontextPipeline", "model='flux-kontext'"))
    expect_error(ValueError, lambda: load_pipeline(flux, "flux", pipeline_class="FluxKontextPipeline"),
                 contains=("FluxKontextPipeline", "flux-kontext"))



def test_what_twinflow_saved_records_its_family(tmp_path):
    load_pipeline(tiny_pipelines.saved_pipeline("flux-kontext", "aux"), "flux-kontext").save_pretrained(tmp_path)
    expect_error(ValueError, lambda: load_pipeline(tmp_path, "flux"), contains=("model='flux'", "flux-kontext"))


def test_edit_plus_is_its_own_family():
    tiny_pipelines.needs_pipeline("qwen-image-edit")
    edit = tiny_pipelines.saved_pipeline("qwen-image-edit", "stock")
    expect_error(ValueError, lambda: load_pipeline(edit, "qwen-image-edit", pipeline_class="QwenImageEditPlusPipeline"),
                 contains=("QwenImageEditPlusPipeline", "qwen-image-edit-plus"))
    expect_error(ValueError, lambda: load_pipeline(edit, "qwen-image-edit-plus"),
                 contains=("QwenImageEditPipeline", "model='qwen-image-edit'"))
    expect_error(ValueError, lambda: load_pipeline(tiny_pipelines.saved_pipeline("qwen-image", "stock"),
                                                   "qwen-image-edit"),
                 contains=("QwenImagePipeline", "model='qwen-image'"))
