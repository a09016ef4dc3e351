"""Memory of TwinFlow pipelines, computed from the published configs (bench/published_configs.json,
no download): the bytes of each component in each weight format, and the peak GPU memory of a
1024² generation in each mode, with which modes fit 16 GB and 24 GB cards.

    python bench/memory_table.py [--vae-activations bench/results/vae_decode_cpu.json] [--json out.json]

Weights: every component is built on the meta device from its published config (diffusers /
transformers classes) and its nn.Linear weights are counted apart from the rest:

* bf16: 2 bytes per element;
* int8 / fp8 (torchao weight-only): 1 byte per linear weight element + one scale per output row
  (bf16 for int8, fp32 for fp8); the rest bf16;
* nf4 (bitsandbytes, double quantization, block 64): 0.5 byte + 1/64 byte (8-bit absmax) +
  4/(64·256) byte (its fp32 scale) per linear weight element; bnb-int8: 1 byte + an fp32
  scale per row; the rest bf16;
* GGUF Q8_0 (34 bytes per 32) / Q4_K (144 bytes per 256, in_features a multiple of 256): the
  transformer's linear weights (what ``twinflow export-gguf`` quantizes; the time embedders and
  tensors under 4096 elements stay as they are, bf16 once loaded; a Q4_K row that is not a
  multiple of 256 values is Q8_0); GGUF applies to the transformer only: those rows give the
  text encoders int8 (``load_pipeline(base, transformer="x.gguf", quantization_config="int8")``).

The transformer's time embedders are never quantized (``twinflow.quantization``); language-model
heads (``lm_head``) stay bf16, as transformers leaves them.

Peak GPU memory of one 1024² image, batch 1, guidance off (TwinFlow models run without CFG):
weights resident + the largest activation of the phase that runs. Transformer activations are
estimated as S·(2·ffn + 8·dim)·2 bytes (S = image + 512 text tokens; SDPA keeps no S² matrix);
the text encoders' as L·(2·ffn + 8·dim)·2 bytes for L = 512 tokens; the VAE decode's peak comes
from ``--vae-activations`` (measured on the CPU by bench/vae_decode_cpu.py, float32 halved for
bf16), else from 12 feature maps of the decoder's widest full-resolution stage. 1-NFE and 2-NFE
have the same peak (the second step reuses the first's memory); only the time differs. Not
counted: the CUDA context (about 0.3–0.5 GB) and allocator fragmentation — the "fits" columns
leave 1 GB for them. bench/gpu_memory.sh measures the same rows on a GPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
GB = 1e9
FORMATS = ("bf16", "int8", "fp8", "nf4", "bnb-int8", "gguf-q8_0", "gguf-q4_k")
TIME_EMBEDDERS = {"QwenImageTransformer2DModel": ("time_text_embed",), "ZImageTransformer2DModel": ("t_embedder",),
                  "SD3Transformer2DModel": ("time_text_embed",)}
TEXT_TOKENS = 512
IMAGE = 1024


def build(component: dict, device="meta"):
    """The component built from its config on `device` (meta: no memory, for counting)."""
    import diffusers
    import torch
    import transformers

    cfg = {k: v for k, v in component["config"].items() if not k.startswith("_")}
    with torch.device(device):
        if component["library"] == "diffusers":
            cls = getattr(diffusers, component["class"])
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls.from_config(cfg)
        cls = getattr(transformers, component["class"])
        config = cls.config_class(**cfg)
        return cls._from_config(config)


def census(model, cls_name: str) -> dict:
    """Element counts: quantizable linear weights (with their rows and in_features), the rest."""
    import torch

    keep = TIME_EMBEDDERS.get(cls_name, ())
    linear, counted = [], set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if name.split(".")[0] in keep or name.endswith("lm_head"):
                continue
            linear.append((m.weight.numel(), m.weight.shape[0], m.weight.shape[1]))
            counted.add(id(m.weight))
    total = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for _, b in model.named_buffers() if b is not None)
    lin = sum(n for n, _, _ in linear)
    other = max([p.numel() for p in model.parameters() if id(p) not in counted] + [0])
    return {"total": total, "linear": linear, "linear_elements": lin, "rest": total - lin, "largest_other": other}


def weight_bytes(c: dict, fmt: str, role: str) -> float:
    """Bytes of a component in a format; `role` "transformer" or "text" (GGUF: transformer only)."""
    rest = 2.0 * c["rest"]
    if fmt == "bf16":
        return 2.0 * c["total"]
    if fmt.startswith("gguf") and role != "transformer":  # GGUF is the transformer's; text encoders int8
        return weight_bytes(c, "int8", role)
    b = rest
    for n, rows, cols in c["linear"]:
        if fmt == "int8":
            b += n + 2 * rows
        elif fmt == "fp8":
            b += n + 4 * rows
        elif fmt == "nf4":
            b += n * (0.5 + 1 / 64 + 4 / (64 * 256))
        elif fmt == "bnb-int8":
            b += n + 4 * rows
        elif fmt == "gguf-q8_0":
            b += n * 34 / 32 if cols % 32 == 0 and n >= 4096 else 2 * n
        elif fmt == "gguf-q4_k":  # rows not a multiple of 256 fall back to Q8_0 (twinflow.gguf_files)
            b += (n * 144 / 256 if cols % 256 == 0 else n * 34 / 32 if cols % 32 == 0 else 2 * n) if n >= 4096 else 2 * n
    return b


def _dims(component: dict):
    """(model width, FFN width) of a transformer or text encoder config."""
    cfg = component["config"]
    cls = component["class"]
    if cls in ("QwenImageTransformer2DModel", "SD3Transformer2DModel"):
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return dim, 4 * dim
    if cls == "ZImageTransformer2DModel":
        return cfg["dim"], int(cfg["dim"] / 3 * 8)
    text = cfg.get("text_config", cfg)
    return text.get("hidden_size", text.get("d_model")), text.get("intermediate_size", text.get("d_ff"))


def activation_bytes(component: dict, role: str) -> float:
    dim, ffn = _dims(component)
    tokens = (IMAGE // 16) ** 2 + TEXT_TOKENS if role == "transformer" else TEXT_TOKENS
    return tokens * (2 * ffn + 8 * dim) * 2.0


def vae_activation_bytes(pipeline: str, component: dict, measured: dict) -> float:
    if pipeline in measured:
        return measured[pipeline]
    cfg = component["config"]
    widths = cfg.get("block_out_channels") or [cfg.get("base_dim", 96) * m for m in cfg.get("dim_mult", [1])]
    return 12 * IMAGE * IMAGE * widths[0] * 2.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=pathlib.Path, default=HERE / "published_configs.json")
    p.add_argument("--vae-activations", type=pathlib.Path, default=HERE / "results" / "vae_decode_cpu.json")
    p.add_argument("--json", type=pathlib.Path, default=None)
    args = p.parse_args()
    configs = json.loads(args.configs.read_text())
    measured = {}
    if args.vae_activations.is_file():
        measured = {k: v["bf16_peak_bytes"] for k, v in json.loads(args.vae_activations.read_text()).items()}
    out = {}
    print("## Weights (GB, 1e9 bytes), computed from the published configs\n")
    print("| pipeline | component | class | parameters | " + " | ".join(FORMATS) + " |")
    print("|---|---|---|---:|" + "---:|" * len(FORMATS))
    for name, pipe in configs.items():
        rows = {}
        for comp, spec in pipe["components"].items():
            role = "transformer" if comp == "transformer" else ("vae" if comp == "vae" else "text")
            c = census(build(spec), spec["class"])
            fmts = {f: (weight_bytes(c, f, role) if role != "vae" else 2.0 * c["total"]) for f in FORMATS}
            largest = {f: max([weight_bytes({"total": n, "rest": 0, "linear": [(n, r, k)]}, f, role)
                               for n, r, k in c["linear"]] + [2.0 * c["largest_other"]]) for f in FORMATS}
            rows[comp] = {"role": role, "class": spec["class"], "params": c["total"], "bytes": fmts,
                          "largest": largest,
                          "activation": (vae_activation_bytes(name, spec, measured) if role == "vae"
                                         else activation_bytes(spec, role))}
            print(f"| {pipe['label']} | {comp} | {spec['class']} | {c['total'] / 1e9:.2f}B | "
                  + " | ".join(f"{fmts[f] / GB:.2f}" for f in FORMATS) + " |")
        out[name] = {"label": pipe["label"], "components": rows}
    print("\n## Peak GPU memory of a 1024² generation, 1 or 2 NFE (GB; + CUDA context)\n")
    print("| pipeline | weights | offload | peak GB | fits 16 GB | fits 24 GB | host RAM GB |")
    print("|---|---|---|---:|:---:|:---:|---:|")
    for name, pipe in out.items():
        comps = pipe["components"]
        pipe["peaks"] = {}
        for fmt in FORMATS:
            for offload in ("none", "model", "group"):
                w = {k: v["bytes"][fmt] for k, v in comps.items()}
                a = {k: v["activation"] for k, v in comps.items()}
                if offload == "none":
                    peak = sum(w.values()) + max(a.values())
                elif offload == "model":
                    peak = max(w[k] + a[k] for k in comps)
                else:  # leaf-level group offload with streams: a layer and the prefetched next one
                    peak = max(a.values()) + 2 * max(v["largest"][fmt] for v in comps.values())
                pipe["peaks"][f"{fmt}/{offload}"] = peak
                fits = lambda cap: "yes" if peak + 1 * GB <= cap * GB else "no"  # noqa: E731
                host = sum(w.values()) if offload != "none" else 0.0  # offloaded weights wait in CPU memory
                print(f"| {pipe['label']} | {fmt} | {offload} | {peak / GB:.1f} | {fits(16)} | {fits(24)} | "
                      f"{host / GB:.1f} |")
    print("\n## Peak GB by offload mode (rows) and weight format (columns); * fits 16 GB, ** fits 24 GB only\n")
    print("| pipeline | offload | " + " | ".join(FORMATS) + " |")
    print("|---|---|" + "---:|" * len(FORMATS))
    for name, pipe in out.items():
        for offload in ("none", "model", "group"):
            cells = []
            for fmt in FORMATS:
                peak = pipe["peaks"][f"{fmt}/{offload}"]
                mark = "*" if peak + GB <= 16 * GB else "**" if peak + GB <= 24 * GB else ""
                cells.append(f"{peak / GB:.1f}{mark}")
            print(f"| {pipe['label']} | {offload} | " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float) + "\n")
    return 0



if __name__ == "__main__":
    sys.exit(main())
