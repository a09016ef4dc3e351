"""``twinflow export-gguf``: a TwinFlow transformer as a GGUF file (``twinflow.gguf_files``).

    twinflow export-gguf runs/my-twinflow --type Q8_0 -o twinflow-Q8_0.gguf
"""

from __future__ import annotations

from . import gguf_files


def _add_export_arguments(p) -> None:
    p.add_argument("source", help="a TwinFlow pipeline folder (with transformer/) or transformer folder")
    p.add_argument("--type", default="Q8_0", choices=gguf_files.GGUF_TYPES,
                   help="the linear layers' type (time embedders and small tensors stay float32)")
    p.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    p.add_argument("--quiet", action="store_true", help="no summary line")


def _run_export(args) -> int:
    if not str(args.output).lower().endswith(".gguf"):
        raise ValueError(f"--output: expected a .gguf file name, got {args.output!r}")
    try:
        info = gguf_files.export_gguf(args.source, args.output, args.type)
    except (FileNotFoundError, ImportError) as e:
        raise ValueError(str(e)) from e
    mode = "no recorded mode" if info["mode"] is None else f"{info['mode']} mode"
    if not args.quiet:
        print(f"wrote {args.output}: {info['backbone']} ({mode}), {info['quantized']} of {info['tensors']} "
              f"tensors in {info['type']}, {info['bytes']} bytes")
    return 0


def _register() -> None:
    from .cli import register_command

    register_command("export-gguf", add_arguments=_add_export_arguments,
                     help="write a TwinFlow transformer as a GGUF file (Q8_0, Q4_K or BF16)",
                     description="Writes the transformer of a TwinFlow pipeline or transformer folder as a GGUF file "
                                 "that load_pipeline(base, transformer='file.gguf') and twinflow generate "
                                 "--transformer read back, aux target-time embedder included.")(_run_export)


_register()
