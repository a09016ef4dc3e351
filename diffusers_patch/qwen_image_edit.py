"""TwinFlow on Qwen-Image-Edit (diffusers ``QwenImageEditPipeline``), docs/algorithm.md §4.

The transformer is Qwen-Image's (``QwenImageTransformer2DModel``), and so is the patch: the
time mapping, aux embedder, LoRA label and keys of ``qwen_image`` (its ``QwenImage`` declaration
is subclassed here). What editing adds:

* the reference image is conditioning, never noised: the pipeline VAE-encodes it (posterior
  mode, ``sample_mode="argmax"``), packs it into 2×2 tokens and appends them to the noisy
  target's tokens at every call (``torch.cat([latents, image_latents], dim=1)``, ``img_shapes``
  = [[target, reference]]), and keeps the output's first tokens. ``call`` does the same with the
  reference latents that end the cond list;
* its time: with ``zero_cond_t`` (the transformer config of Qwen-Image-Edit-2511) the transformer
  embeds ``cat([t, 0·t])`` and modulates the reference tokens with the second half; the
  ``qwen_image`` hook keeps t = tt = 0 there (no aux term, LoRA label 0), so the reference is
  embedded as the stock model embeds it whatever tt is. Without ``zero_cond_t`` (Qwen-Image-Edit,
  -2509) every token shares temb(t, tt), as the stock model shares temb(t);
* the text: Qwen2.5-VL reads the prompt with the reference image (resized as the pipeline does
  it: to about 1 MP here, to 384² for Edit-Plus, ``qwen_image_edit_plus``).

Training follows the published TwinFlow Qwen-Image-Edit recipe (inclusionAI/TwinFlow,
src/networks/qwen_image/modeling_qwen_image.py, ``model_type="edit"``; src/README.md, "QwenImage
and QwenImage-Edit Training"): the reference latents are the posterior mean (= mode), packed and
appended after the target's, both branches get them (c = [embeds, mask, reference],
e = [null embeds, null mask, reference]); the unconditional text is "Edit this image." read with
the same reference image. The published code uses ``QwenImageEditPlusPipeline``: that is
``qwen-image-edit-plus``.
"""

from __future__ import annotations

from typing import List

import torch

from ._backbone import ones_mask
from ._edit import reference_images
from .qwen_image import AUX_PREFIX, QwenImage

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch"]

#: the area (pixels) QwenImageEditPipeline resizes the reference to, for the VAE and for Qwen2.5-VL
#: (``calculate_dimensions(1024 * 1024, ratio)`` in its ``__call__``)
VAE_AREA = 1024 * 1024


class QwenImageEdit(QwenImage):
    name, label = "qwen-image-edit", "Qwen-Image-Edit"
    pipeline_class_name = "QwenImageEditPipeline"
    edit = True
    #: the published unconditional prompt of the edit training, read with the reference image
    null_texts = ("Edit this image.",)
    #: the area of the image Qwen2.5-VL reads with the prompt (the pipeline's resize)
    condition_area = VAE_AREA

    def check_environment(self) -> None:
        """ImportError unless transformers can build the pipeline's ``Qwen2VLProcessor``."""
        import importlib.util

        if importlib.util.find_spec("torchvision") is None:
            import transformers

            raise ImportError(f"{self.name}: the pipeline's Qwen2VLProcessor needs torchvision (transformers "
                              f"{transformers.__version__} builds it with a video processor, which needs "
                              "torchvision): pip install torchvision")

    def reference_arg(self, pipe, image, prompts: int):
        if prompts == 1:
            return image
        # A list is one image per prompt, but QwenImageEditPipeline resizes only a single image for
        # Qwen2.5-VL (a list reaches it at its own size): hand it the images it resizes one to, so
        # that a prompt gets the same conditioning in a batch as alone.
        return [self.condition_image(pipe, image)] * prompts

    def call(self, transformer, x, t, cond):
        return self._velocity(transformer, x, t, cond[0], cond[1], reference=cond[2])

    def area_size(self, area: int, width: int, height: int):
        """(width, height) of `area` pixels at the aspect ratio width / height, each side a
        multiple of 32: the pipeline module's own ``calculate_dimensions``."""
        import importlib

        dims = importlib.import_module(self.pipeline_class().__module__).calculate_dimensions
        w, h = dims(area, width / height)[:2]
        return int(w), int(h)

    def condition_image(self, pipe, image):
        """The reference as the pipeline hands it to Qwen2.5-VL (its own resize)."""
        w, h = self.area_size(self.condition_area, *image.size)
        return pipe.image_processor.resize(image, h, w)

    def encode_text(self, pipe, texts: List[str], device, references=None):
        images = reference_images(self.name, references, len(texts))
        # one prompt per call, as the pipeline encodes one reference per prompt (Edit-Plus: a list
        # would be several images of one prompt); padded with a zero mask like its batches
        embeds, masks = [], []
        for text, image in zip(texts, images):
            pe, mask = pipe.encode_prompt(prompt=[text], image=[self.condition_image(pipe, image)], device=device)
            embeds.append(pe[0])
            masks.append(ones_mask(pe, mask)[0])
        n = max(e.shape[0] for e in embeds)
        pe = torch.stack([torch.cat([e, e.new_zeros(n - e.shape[0], e.shape[1])]) for e in embeds])
        mask = torch.stack([torch.cat([m, m.new_zeros(n - m.shape[0])]) for m in masks])
        return {"prompt_embeds": pe, "prompt_embeds_mask": mask}


BACKBONE = QwenImageEdit()
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
