"""Quantized TwinFlow pipelines, the diffusers way.

``twinflow.load_pipeline(..., quantization_config=...)`` takes what diffusers'
``DiffusionPipeline.from_pretrained`` takes (a ``PipelineQuantizationConfig``, a per-component
dict of diffusers / transformers quantization configs, or one diffusers config for the
transformer) or one of the names in :data:`QUANTIZE_CHOICES` (what ``twinflow generate
--quantize`` offers), and hands it on. What twinflow adds:

* the time embedders stay unquantized: the transformer's config gets the hooked embedder in its
  skip list (``modules_to_not_convert`` / ``llm_int8_skip_modules``), and any quantized layer
  that is still there after loading (optimum-quanto only matches leaf names; a GGUF file
  stores what its writer chose) is replaced by a plain ``nn.Linear`` with the dequantized
  weights in the compute dtype. The aux target-time embedder is built from that plain copy
  and loaded from the checkpoint's own tensors, so it is never quantized: it is tiny, and it
  multiplies (t − tt), where an error is not averaged away;
* clear errors: an unknown name, a backend that is not installed (naming its pip package), a
  backend the device cannot run (bitsandbytes needs CUDA or XPU).

Example:
    >>> from twinflow.quantization import QUANTIZE_CHOICES, describe
    >>> "int8" in QUANTIZE_CHOICES and describe("int8").startswith("torchao")
    True
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["QUANTIZE_CHOICES", "dequantized_state_dict", "describe", "pipeline_quantization", "plain_linears",
           "quantized_modules", "require_backend"]

#: name → (backend, pip package, what it is, devices it runs on)
_MODES: Dict[str, Tuple[str, str, str, Tuple[str, ...]]] = {
    "int8": ("torchao", "torchao", "torchao int8 weight-only (Int8WeightOnlyConfig)", ("cpu", "cuda", "xpu")),
    "fp8": ("torchao", "torchao", "torchao float8 weight-only (Float8WeightOnlyConfig)", ("cpu", "cuda", "xpu")),
    "nf4": ("bitsandbytes", "bitsandbytes", "bitsandbytes 4-bit NF4, double quantization", ("cuda", "xpu")),
    "bnb-int8": ("bitsandbytes", "bitsandbytes", "bitsandbytes LLM.int8() 8-bit", ("cuda", "xpu")),
}
#: what ``twinflow generate --quantize`` and ``load_pipeline(quantization_config=NAME)`` take
QUANTIZE_CHOICES: Tuple[str, ...] = ("none", *_MODES)


def describe(name: str) -> str:
    """One line saying what a quantization name means."""
    if name == "none":
        return "no quantization (the checkpoint's weights in the compute dtype)"
    return _MODES[_check_name(name)][2]


def _check_name(name: str) -> str:
    if name not in QUANTIZE_CHOICES:
        raise ValueError(f"quantization: unknown name {name!r}; expected one of {', '.join(QUANTIZE_CHOICES)}, "
                         "or a diffusers PipelineQuantizationConfig / quantization config")
    return name


def require_backend(module: str, package: Optional[str] = None) -> None:
    """ImportError naming the pip package when `module` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"quantization needs {package or module}, which is not installed: "
                          f"pip install {package or module}  (or pip install 'twinflow[quant]')")


def _check_device(name: str, device: Optional[torch.device]) -> None:
    runs_on = _MODES[name][3]
    where = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if where not in runs_on:
        raise ValueError(f"quantization {name!r} ({_MODES[name][2]}) runs on {' or '.join(runs_on)} only, "
                         f"not on {where}; on a CPU use 'int8' or 'fp8' (torchao)")


def _configs(name: str, dtype: Optional[torch.dtype], skip: List[str]):
    """(diffusers config for the transformer, transformers config for text encoders)."""
    backend, package = _MODES[name][:2]
    require_backend(backend, package)
    import diffusers
    import transformers

    if backend == "torchao":
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

        make = Int8WeightOnlyConfig if name == "int8" else Float8WeightOnlyConfig
        return (diffusers.TorchAoConfig(make(), modules_to_not_convert=list(skip)),
                transformers.TorchAoConfig(make()))
    compute = dtype or torch.float32
    if name == "nf4":
        kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                  bnb_4bit_compute_dtype=compute)
    else:
        kw = dict(load_in_8bit=True)
    return (diffusers.BitsAndBytesConfig(**kw, llm_int8_skip_modules=list(skip)), transformers.BitsAndBytesConfig(**kw))


def _with_skip(config, skip: List[str]):
    """A copy of a diffusers quantization config for the transformer with `skip` added to the
    modules it leaves unquantized (the attribute each backend reads)."""
    config = copy.deepcopy(config)
    for attr in ("modules_to_not_convert", "llm_int8_skip_modules"):
        if hasattr(config, attr):
            have = getattr(config, attr) or []
            have = [have] if isinstance(have, str) else list(have)
            setattr(config, attr, have + [s for s in skip if s not in have])
            break
    return config


def pipeline_quantization(quantization_config, *, transformer_skip: Iterable[str], text_encoders: Iterable[str],
                          dtype: Optional[torch.dtype], device: Optional[torch.device]):
    """(the transformer's diffusers config or None, what the rest of the pipeline gets as
    ``quantization_config`` or None) for what ``load_pipeline`` was given."""
    if quantization_config is None:
        return None, None
    skip = list(transformer_skip)
    import diffusers

    PQC = diffusers.PipelineQuantizationConfig
    if isinstance(quantization_config, str):
        name = _check_name(quantization_config)
        if name == "none":
            return None, None
        _check_device(name, device)
        tcfg, text_cfg = _configs(name, dtype, skip)
        rest = {c: copy.deepcopy(text_cfg) for c in text_encoders}
        return tcfg, (PQC(quant_mapping=rest) if rest else None)
    if isinstance(quantization_config, dict):
        mapping = dict(quantization_config)
        tcfg = mapping.pop("transformer", None)
        return (None if tcfg is None else _with_skip(tcfg, skip)), (PQC(quant_mapping=mapping) if mapping else None)
    if isinstance(quantization_config, PQC):
        tcfg = quantization_config._resolve_quant_config(is_diffusers=True, module_name="transformer")
        rest = copy.deepcopy(quantization_config)
        if rest.is_granular:
            rest.quant_mapping = {k: v for k, v in rest.quant_mapping.items() if k != "transformer"}
            rest = rest if rest.quant_mapping else None
        elif rest.components_to_quantize:
            rest.components_to_quantize = [c for c in rest.components_to_quantize if c != "transformer"]
            rest = rest if rest.components_to_quantize else None
        else:  # all components: name them, without the transformer (loaded by twinflow)
            rest.components_to_quantize = list(text_encoders)
            rest = rest if rest.components_to_quantize else None
        return (None if tcfg is None else _with_skip(tcfg, skip)), rest
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

    if isinstance(quantization_config, QuantizationConfigMixin):
        return _with_skip(quantization_config, skip), None
    raise TypeError("quantization_config: expected a name (" + ", ".join(QUANTIZE_CHOICES) + "), a diffusers "
                    "PipelineQuantizationConfig, a {component: config} dict or a diffusers quantization config, "
                    f"got {type(quantization_config).__name__}")


# ----------------------------------------------------------------------------- plain layers

def _is_quantized_tensor(t: Optional[torch.Tensor]) -> bool:
    return t is not None and type(t.data if isinstance(t, nn.Parameter) else t) is not torch.Tensor


def _is_quantized_linear(m: nn.Module) -> bool:
    if not isinstance(m, nn.Linear) and type(m).__name__ not in ("QLinear",):
        return False
    return type(m) is not nn.Linear or _is_quantized_tensor(m.weight) or _is_quantized_tensor(m.bias)


def quantized_modules(module: nn.Module) -> List[str]:
    """Names of the quantized layers under `module` ([] when it is plain)."""
    return [n or "." for n, m in module.named_modules() if _is_quantized_linear(m)
            or any(_is_quantized_tensor(p) for p in m.parameters(recurse=False))]


def _dequantize(linear: nn.Module, t: Optional[torch.Tensor], is_weight: bool) -> Optional[torch.Tensor]:
    if t is None:
        return None
    kind = type(linear).__name__
    if is_weight and kind in ("Linear4bit", "Linear8bitLt"):
        from diffusers.quantizers.bitsandbytes.utils import dequantize_bnb_weight

        return dequantize_bnb_weight(t, state=getattr(linear, "state", None))
    if type(t).__name__ == "GGUFParameter":
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        return dequantize_gguf_tensor(t)
    data = t.data if isinstance(t, nn.Parameter) else t
    if type(data) is torch.Tensor:
        return data
    if hasattr(data, "dequantize"):  # torchao and optimum-quanto tensor subclasses
        return data.dequantize()
    raise TypeError(f"cannot dequantize a {type(data).__name__} in a {kind}")


def plain_linears(module: nn.Module, dtype: Optional[torch.dtype] = None) -> List[str]:
    """Replace every quantized linear layer under `module` by a plain ``nn.Linear`` holding its
    dequantized weights (in `dtype`, default the dequantized dtype). Returns their names."""
    replaced = []
    for name, child in list(module.named_modules()):
        if not name or not _is_quantized_linear(child):
            continue
        weight = _dequantize(child, child.weight, True)
        bias = _dequantize(child, child.bias, False)
        out_f, in_f = weight.shape
        plain = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device,
                          dtype=dtype or weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(weight.to(plain.weight.dtype))
            if bias is not None:
                plain.bias.copy_(bias.to(plain.bias.dtype))
        plain.requires_grad_(child.weight.requires_grad)
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, plain)
        replaced.append(name)
    return replaced


def dequantized_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The parameters and persistent buffers of `module` as plain tensors, quantized weights
    dequantized (the backends' own bookkeeping entries left out): what a merged QLoRA export
    saves."""
    out: Dict[str, torch.Tensor] = {}
    for mname, m in module.named_modules():
        prefix = f"{mname}." if mname else ""
        quantized = _is_quantized_linear(m)
        for pname, p in m.named_parameters(recurse=False):
            if quantized or _is_quantized_tensor(p):
                out[prefix + pname] = _dequantize(m, p, pname == "weight").detach()
            else:
                out[prefix + pname] = p.detach()
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set:
                out[prefix + bname] = b.detach()
    return out
