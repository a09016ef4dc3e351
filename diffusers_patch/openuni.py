"""TwinFlow patch and published facts for OpenUni (InternVL3-2B's language model + Sana 1.6B), docs/algorithm.md §4.

OpenUni's generator is a stock ``SanaTransformer2DModel`` fed by 256 learned meta-queries read
by the frozen InternVL3-2B language model (a Qwen2 LM), then a connector (6-layer bidirectional
pre-LayerNorm encoder, the layout of transformers' ``SiglipEncoder``) and a projector
(Linear 1536 → 2304). The pipeline around it is ``twinflow.openuni_pipeline.OpenUniPipeline``.

``BACKBONE`` is Sana's (``diffusers_patch.sana``: the published wrapper feeds timestep = 1000·t
and target_timestep = 1000·tt and adds ``time_embed_2(1000·tt)·(t − tt)`` to both the
modulation and the embedded timestep) with OpenUni's own parts: the published initialisation
of a fresh aux embedder (weights N(0, 0.02), biases 0: ``init_time_embed_2_weights``; trained
``time_embed_2.*`` weights in a checkpoint replace it), the pipeline class, text encoding
through the LM + meta-queries + connector + projector (the unconditional branch is the
published CFG prompt), and loading from the published ``.pth`` (``load_from_parts``).

The published base weights are one ``.pth`` state dict with the keys below (the OpenUni
training code's module names): ``meta_queries`` [256, 1536], ``connector.layers.{i}.*``,
``projector.{weight,bias}`` and ``transformer.*`` (the Sana transformer's diffusers keys).
"""

from __future__ import annotations

from .sana import Sana

MODEL = "openuni"
AUX_PREFIX = Sana.aux_name + "."

#: the published connector (OpenUni-L 512: ConnectorConfig in its model config)
CONNECTOR_CONFIG = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=6, num_attention_heads=24,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
NUM_QUERIES = 256
#: the published prompt template (InternVL3 chat format; IMG_START_TOKEN closes every prompt)
INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
GENERATION = "Generate an image: {input}"
CFG_PROMPT = "Generate an image."
IMG_START_TOKEN = "<img>"

__all__ = ["AUX_PREFIX", "BACKBONE", "patch", "unpatch", "chat_prompt"]


def chat_prompt(prompt) -> str:
    """The text the language model reads for `prompt` (None: the published CFG prompt)."""
    body = CFG_PROMPT if prompt is None else GENERATION.format(input=prompt.strip())
    return INSTRUCTION.format(input=body) + IMG_START_TOKEN


class OpenUni(Sana):
    name, label = MODEL, "OpenUni"
    pipeline_class_name = "OpenUniPipeline"
    aux_init = "normal"
    exact_size = ()  # OpenUniPipeline renders height × width as asked
    #: the prompts whose embeddings are the unconditional branch: the published CFG prompt
    null_texts = (None,)

    def check_config(self, transformer):
        if transformer.config.guidance_embeds:
            raise ValueError("openuni.patch: the OpenUni transformer has no guidance embedder (guidance_embeds=False)")

    def pipeline_class(self):
        from twinflow.openuni_pipeline import OpenUniPipeline

        return OpenUniPipeline

    def load_from_parts(self, path, **kwargs):
        from twinflow.openuni_pipeline import load_openuni_pipeline

        return load_openuni_pipeline(path, **kwargs)

    def encode_text(self, pipe, texts, device):
        from ._backbone import ones_mask

        pe = pipe.encode_texts(list(texts), device)
        return {"prompt_embeds": pe, "prompt_attention_mask": ones_mask(pe, None)}


BACKBONE = OpenUni()
patch, unpatch = BACKBONE.patch, BACKBONE.unpatch
