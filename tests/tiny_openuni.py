"""A tiny random-weight OpenUni (Qwen2 LM + offline tokenizer, 4 meta-queries, 2-layer connector,
the tiny Sana transformer and DC-AE of tiny_pipelines) and its saved forms, for tests.

``saved_openuni(layout)`` (built once per session):

* ``"stock"``: ``OpenUniPipeline.save_pretrained`` of the base model;
* ``"aux"``: the same with a TwinFlow transformer (trained-looking ``time_embed_2.*``);
* ``"pth"``: the published release: ``openuni.pth`` (meta_queries, connector.*, projector.*,
  transformer.* — the OpenUni training code's names) beside ``text_encoder/``, ``tokenizer/``,
  ``vae/`` and ``transformer/config.json``. ``pth_components(root)`` gives the keyword
  arguments that go with it.
"""

from __future__ import annotations

import pathlib
import shutil

import torch

from tiny_pipelines import _qwen_tokenizer, _root, _sana_transformer, tiny_dc_ae, trained_aux_transformer

NUM_QUERIES = 4
_SAVED = {}


def build_openuni():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2Config, Qwen2Model

    from twinflow.openuni_pipeline import OpenUniConnector, OpenUniMetaQueries, OpenUniPipeline, OpenUniProjector

    torch.manual_seed(0)
    transformer = _sana_transformer()
    vae = tiny_dc_ae()
    lm = Qwen2Model(Qwen2Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=320, max_position_embeddings=512)).eval()
    tokenizer = _qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<img>"]})
    meta = OpenUniMetaQueries(num_queries=NUM_QUERIES, hidden_size=16)
    connector = OpenUniConnector(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    projector = OpenUniProjector(16, transformer.config.caption_channels)
    return OpenUniPipeline(text_encoder=lm, tokenizer=tokenizer, meta_queries=meta, connector=connector,
                           projector=projector, transformer=transformer, vae=vae,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def published_state_dict(pipe):
    """The pipeline's weights under the published .pth names."""
    sd = {"meta_queries": pipe.meta_queries.meta_queries.detach().clone()}
    sd.update({"connector." + k[len("encoder."):]: v for k, v in pipe.connector.state_dict().items()})
    sd.update({"projector." + k[len("linear."):]: v for k, v in pipe.projector.state_dict().items()})
    sd.update({"transformer." + k: v for k, v in pipe.transformer.state_dict().items()})
    return sd


def pth_components(root: pathlib.Path) -> dict:
    return dict(text_encoder=root / "text_encoder", tokenizer=root / "tokenizer", vae=root / "vae",
                transformer_config=root / "transformer", connector_config={"num_attention_heads": 2})


def saved_openuni(layout: str = "stock") -> pathlib.Path:
    if layout in _SAVED:
        return _SAVED[layout]
    path = _root() / f"openuni-{layout}"
    pipe = build_openuni()
    if layout == "stock":
        pipe.save_pretrained(path)
    elif layout == "aux":
        pipe.transformer = trained_aux_transformer("openuni", pipe.transformer)
        pipe.save_pretrained(path)
    elif layout == "pth":
        path.mkdir(parents=True)
        torch.save(published_state_dict(pipe), path / "openuni.pth")
        pipe.text_encoder.save_pretrained(path / "text_encoder")
        pipe.tokenizer.save_pretrained(path / "tokenizer")
        pipe.vae.save_pretrained(path / "vae")
        (path / "transformer").mkdir()
        shutil.copy(saved_openuni("stock") / "transformer" / "config.json", path / "transformer" / "config.json")
    else:
        raise ValueError(f"layout: unknown {layout!r}")
    _SAVED[layout] = path
    return path
