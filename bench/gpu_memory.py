"""Peak GPU memory of the transformer call and the VAE decode of a 1024² generation, measured on a
CUDA GPU with random weights built from the published configs (bench/published_configs.json; no
download), per weight format: the measured side of bench/memory_table.py's computed rows.

    python bench/gpu_memory.py --pipelines z-image sd3.5-medium --formats bf16 int8 fp8 [--out F.json]

Each row: the component is built on the meta device, materialised on the GPU with N(0, 0.02)
weights in bf16, quantized in place (torchao ``quantize_`` with the time embedders skipped, as
``twinflow.quantization`` configures diffusers), then one forward at 1024² (batch 1, 512 text
tokens, no grad) is timed and ``torch.cuda.max_memory_allocated`` read. The text encoders are
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


def _materialise(model, device):
    import torch

    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if b is not None and b.is_floating_point():
                b.zero_()
    return model.to(torch.bfloat16)


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


def _transformer_inputs(cls_name: str, cfg: dict, device):
    import torch

    kw = dict(device=device, dtype=torch.bfloat16)
    if cls_name == "QwenImageTransformer2DModel":
        h = w = 1024 // 16
        return dict(hidden_states=torch.randn(1, h * w, cfg["in_channels"], **kw),
                    encoder_hidden_states=torch.randn(1, 512, cfg["joint_attention_dim"], **kw),
                    encoder_hidden_states_mask=torch.ones(1, 512, dtype=torch.long, device=device),
                    timestep=torch.full((1,), 0.5, **kw), img_shapes=[[(1, h, w)]], return_dict=False)
    if cls_name == "SD3Transformer2DModel":
        return dict(hidden_states=torch.randn(1, cfg["in_channels"], 128, 128, **kw),
                    encoder_hidden_states=torch.randn(1, 512, cfg["joint_attention_dim"], **kw),
                    pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], **kw),
                    timestep=torch.full((1,), 500.0, **kw), return_dict=False)
    if cls_name == "ZImageTransformer2DModel":
        return dict(x=[torch.randn(cfg["in_channels"], 1, 128, 128, **kw)], t=torch.full((1,), 0.5, **kw),
                    cap_feats=[torch.randn(512, cfg["cap_feat_dim"], **kw)], return_dict=False)
    raise ValueError(cls_name)


def measure(spec: dict, fmt: str, role: str) -> dict:
    import torch

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = _materialise(build(spec), device).eval()
    if role == "transformer":
        _quantize(model, fmt, spec["class"])
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cfg = spec["config"]
    t0 = time.perf_counter()
    with torch.no_grad():
        if role == "transformer":
            model(**_transformer_inputs(spec["class"], cfg, device))
        else:
            ch = cfg.get("latent_channels", cfg.get("z_dim"))
            shape = (1, ch, 1, 128, 128) if spec["class"] == "AutoencoderKLQwenImage" else (1, ch, 128, 128)
            model.decode(torch.randn(shape, device=device, dtype=torch.bfloat16))
    torch.cuda.synchronize()
    row = {"class": spec["class"], "format": fmt, "weights_bytes": weights,
           "peak_bytes": torch.cuda.max_memory_allocated(), "seconds": time.perf_counter() - t0}
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
