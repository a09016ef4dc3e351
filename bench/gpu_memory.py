"""Peak GPU memory of the transformer call and the VAE decode of a 1024² generation, measured on a
CUDA GPU with random weights built from the published configs (bench/published_configs.json; no
download), per weight format: the measured side of bench/memory_table.py's computed rows.

    python bench/gpu_memory.py --pipelines z-image sd3.5-medium --formats bf16 int8 fp8 [--out F.json]

Each row: the component is built on the GPU in bf16 with N(0, 0.02) weights, quantized in place (torchao ``quantize_`` with the time embedders skipped, as
``twinflow.quantization`` configures diffusers), then one forward at 1024² (batch 1, 512 text
tokens, no grad) runs; the row holds ``torch.cuda.max_memory_allocated`` (weights + the call's
activations: build and call are one measurement) and the time of both. tests/package/test_bench_gpu_memory.py
runs the same code on the CPU with tiny configs, so the script is known to run before GPU time
is spent on it. The text encoders are
not run (their activations are small next to the transformer's; their weights are in the
computed table).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memory_table import TIME_EMBEDDERS, build  # noqa: E402


def _materialise(spec: dict, device):
    """The component built directly on `device` in bf16 (default dtype during construction, so a
    20B model never exists in float32; tensors a module computes in its constructor, such as
    Qwen-Image's RoPE tables, are real), with N(0, 0.02) weights."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = build(spec, device=device)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def _quantize(model, fmt: str, cls_name: str) -> None:
    if fmt == "bf16":
        return
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    skip = TIME_EMBEDDERS.get(cls_name, ())
    config = Int8WeightOnlyConfig() if fmt == "int8" else Float8WeightOnlyConfig()

    def wanted(module, fqn):
        import torch

        return isinstance(module, torch.nn.Linear) and fqn.split(".")[0] not in skip

    quantize_(model, config, filter_fn=wanted)


def _transformer_inputs(cls_name: str, cfg: dict, device, image: int = 1024, text: int = 512):
    import torch

    kw = dict(device=device, dtype=torch.bfloat16)
    lat = image // 8
    if cls_name == "QwenImageTransformer2DModel":
        h = w = image // 16
        return dict(hidden_states=torch.randn(1, h * w, cfg["in_channels"], **kw),
                    encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], **kw),
                    encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long, device=device),
                    timestep=torch.full((1,), 0.5, **kw), img_shapes=[[(1, h, w)]], return_dict=False)
    if cls_name == "SD3Transformer2DModel":
        return dict(hidden_states=torch.randn(1, cfg["in_channels"], lat, lat, **kw),
                    encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], **kw),
                    pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], **kw),
                    timestep=torch.full((1,), 500.0, **kw), return_dict=False)
    if cls_name == "ZImageTransformer2DModel":
        return dict(x=[torch.randn(cfg["in_channels"], 1, lat, lat, **kw)], t=torch.full((1,), 0.5, **kw),
                    cap_feats=[torch.randn(text, cfg["cap_feat_dim"], **kw)], return_dict=False)
    raise ValueError(cls_name)


def run_component(spec: dict, fmt: str, role: str, device, image: int = 1024, text: int = 512):
    """Build, materialise and (transformer) quantize one component on `device`, then run its
    1024² call: the transformer forward, or the VAE decode. Returns (model, output)."""
    import torch

    model = _materialise(spec, device).eval()
    if role == "transformer":
        _quantize(model, fmt, spec["class"])
    cfg = spec["config"]
    with torch.no_grad():
        if role == "transformer":
            return model, model(**_transformer_inputs(spec["class"], cfg, device, image, text))
        ch = cfg.get("latent_channels", cfg.get("z_dim"))
        side = image // 8
        shape = (1, ch, 1, side, side) if spec["class"] == "AutoencoderKLQwenImage" else (1, ch, side, side)
        return model, model.decode(torch.randn(shape, device=device, dtype=torch.bfloat16))


def measure(spec: dict, fmt: str, role: str) -> dict:
    import torch

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, _ = run_component(spec, fmt, role, device)
    torch.cuda.synchronize()
    row = {"class": spec["class"], "format": fmt, "peak_bytes": torch.cuda.max_memory_allocated(),
           "weights_bytes": torch.cuda.memory_allocated(), "seconds": time.perf_counter() - t0}
    del model
    torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipelines", nargs="+", default=["z-image", "sd3.5-medium", "sd3.5-large", "qwen-image"])
    p.add_argument("--formats", nargs="+", default=["bf16", "int8", "fp8"], choices=["bf16", "int8", "fp8"])
    p.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "gpu_memory.json")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_memory.py needs a CUDA GPU", file=sys.stderr)
        return 2
    configs = json.loads((HERE / "published_configs.json").read_text())
    rows = []
    for name in args.pipelines:
        comps = configs[name]["components"]
        rows.append({"pipeline": name, "component": "vae", **measure(comps["vae"], "bf16", "vae")})
        for fmt in args.formats:
            try:
                rows.append({"pipeline": name, "component": "transformer",
                             **measure(comps["transformer"], fmt, "transformer")})
            except torch.cuda.OutOfMemoryError as e:
                rows.append({"pipeline": name, "component": "transformer", "format": fmt, "error": str(e)[:200]})
            r = rows[-1]
            print(json.dumps(r), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
