"""Image-to-image and inpainting variants of the registered families with the TwinFlow scheduler at 1–2 steps:
``load_pipeline(..., pipeline_class=...)`` loads the family's Img2Img pipeline wired to itself,
``strength`` is honoured (the scheduler's ``set_begin_index`` / ``scale_noise``: strength s runs
the last ⌊s·n⌋ of n steps, so the transformer is called that many times, and the input image
matters), and ``AutoPipelineForImage2Image.from_pipe`` gives the same images; the inpainting
variants keep the image outside the mask."""

from __future__ import annotations

import pytest
import torch

import tiny_pipelines
from checks import expect_error
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)
from twinflow import diffusers_patch, load_pipeline
from twinflow.diffusers_patch import backbone

IMG2IMG = {"sd3": "StableDiffusion3Img2ImgPipeline", "flux": "FluxImg2ImgPipeline",
           "qwen-image": "QwenImageImg2ImgPipeline", "z-image": "ZImageImg2ImgPipeline"}
SIZE = tiny_pipelines.TEST_SIZE


def run(pipe, model, image, strength, steps=2):
    pipe.set_progress_bar_config(disable=True)
    extra = {backbone(model).cfg_kwarg: 0.0 if model == "z-image" else 1.0}
    with torch.no_grad():
        return pipe("a cat", image=image, strength=strength, num_inference_steps=steps, height=SIZE, width=SIZE,
                    output_type="pt", generator=torch.Generator().manual_seed(0), **extra).images


@pytest.mark.parametrize("model", sorted(IMG2IMG))
def test_img2img_pipeline_class_and_strength(model):
    folder = tiny_pipelines.saved_pipeline(model, "aux")
    pipe = load_pipeline(folder, model, pipeline_class=IMG2IMG[model])
    assert type(pipe).__name__ == IMG2IMG[model]
    # wired to this pipeline (not to a temporary one): it reads the target time from pipe.scheduler
    ref = diffusers_patch._common.TT_ATTR
    assert getattr(pipe.transformer, ref)() is pipe
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    other = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    for steps, strength, want in ((2, 1.0, 2), (2, 0.5, 1), (1, 1.0, 1)):
        calls.clear()
        out = run(pipe, model, image, strength, steps)
        assert torch.isfinite(out).all() and len(calls) == want, (steps, strength, len(calls))
    hook.remove()
    half = run(pipe, model, image, 0.5)
    assert not torch.allclose(half, run(pipe, model, other, 0.5), atol=1e-3)  # the input image matters
    assert not torch.allclose(half, run(pipe, model, image, 1.0), atol=1e-3)  # and the strength
    from diffusers import AutoPipelineForImage2Image

    base = load_pipeline(folder, model)
    via = AutoPipelineForImage2Image.from_pipe(base)
    assert type(via).__name__ == IMG2IMG[model]
    assert torch.equal(run(via, model, image, 0.5), half)


def test_pipeline_class_errors():
    folder = tiny_pipelines.saved_pipeline("sd3", "aux")
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", pipeline_class="FluxImg2ImgPipeline"),
                 contains="not a SD3 / SD3.5 pipeline")
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", pipeline_class="NoSuchPipeline"),
                 contains="pipeline_class")
    expect_error(ValueError, lambda: load_pipeline(folder, "sd3", pipeline_class=int), contains="pipeline_class")


# Not here: StableDiffusion3InpaintPipeline needs a 16-channel latent space (the tiny SD3 has 4);
# diffusers 0.42.1's ChromaInpaintPipeline reads `transformer.config.guidance_embeds`, which
# ChromaTransformer2DModel does not have (it fails with the stock scheduler too).
INPAINT = {"flux": "FluxInpaintPipeline", "qwen-image": "QwenImageInpaintPipeline", "z-image": "ZImageInpaintPipeline"}


def inpaint(pipe, model, image, mask, prompt="a cat", strength=1.0, steps=2):
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, image=image, mask_image=mask, strength=strength, num_inference_steps=steps,
                    height=SIZE, width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **{backbone(model).cfg_kwarg: 0.0 if model == "z-image" else 1.0}).images


@pytest.mark.parametrize("model", sorted(INPAINT))
def test_inpaint_pipeline_keeps_the_unmasked_image(model):
    """The inpainting variant at 1–2 TwinFlow steps: between steps the pipeline puts the image
    back outside the mask, noised to the next step's time with the scheduler's ``scale_noise``,
    and after the last step the image itself. So a mask that keeps everything returns the same
    latents whatever the prompt, and a mask that repaints everything does not; strength counts
    the transformer calls as for image-to-image."""
    pipe = load_pipeline(tiny_pipelines.saved_pipeline(model, "aux"), model, pipeline_class=INPAINT[model])
    assert type(pipe).__name__ == INPAINT[model]
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    keep, repaint = torch.zeros(1, 1, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE)
    kept = inpaint(pipe, model, image, keep)
    assert torch.equal(kept, inpaint(pipe, model, image, keep, prompt="a dog"))
    painted = inpaint(pipe, model, image, repaint)
    assert torch.isfinite(painted).all()
    assert not torch.allclose(painted, inpaint(pipe, model, image, repaint, prompt="a dog"), atol=1e-4)
    assert not torch.allclose(painted, kept, atol=1e-4)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    for steps, strength, want in ((2, 1.0, 2), (2, 0.5, 1), (1, 1.0, 1)):
        calls.clear()
        inpaint(pipe, model, image, repaint, strength=strength, steps=steps)
        assert len(calls) == want, (steps, strength, len(calls))
    hook.remove()
