"""TwinFlow on Qwen-Image-Edit-Plus (Qwen-Image-Edit-2509 / -2511; diffusers
``QwenImageEditPlusPipeline``), docs/algorithm.md §4: ``qwen_image_edit`` with the Plus
pipeline, the one the published TwinFlow edit training loads.

A registry entry of its own, not ``load_pipeline(..., pipeline_class=...)`` of
``qwen-image-edit``: the two pipelines take the same components but condition the text
differently (Plus reads the reference at 384² with a "Picture 1:" prompt, Edit at about 1 MP
without), and training must encode it as the checkpoint's pipeline will. As its own family the
name is recorded in what twinflow saves, so ``twinflow train``, ``load_pipeline`` and
``twinflow generate`` all use the Plus pipeline for it. Plus generates one prompt per call.
"""

from __future__ import annotations

from .qwen_image_edit import AUX_PREFIX, QwenImageEdit

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch"]

class QwenImageEditPlus(QwenImageEdit):
    name, label = "qwen-image-edit-plus", "Qwen-Image-Edit-Plus"
    pipeline_class_name = "QwenImageEditPlusPipeline"

    @property
    def condition_area(self) -> int:  # type: ignore[override]
        """The area Plus resizes each reference to for Qwen2.5-VL: its module's CONDITION_IMAGE_SIZE (384²)."""
        import importlib

        return importlib.import_module(self.pipeline_class().__module__).CONDITION_IMAGE_SIZE

    def reference_arg(self, pipe, image, prompts: int):
        if prompts != 1:  # the pipeline refuses batches; say so in our terms
            raise ValueError(f"{self.name}: QwenImageEditPlusPipeline generates one prompt per call "
                             f"(got {prompts}): use batch size 1")
        return image  # one image; a list would be several reference images of the one prompt


BACKBONE = QwenImageEditPlus()
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
