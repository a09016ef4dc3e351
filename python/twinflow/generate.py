"""``twinflow generate``: images (or videos, for a video family such as Wan) from a TwinFlow
checkpoint folder through the stock diffusers pipeline (``twinflow.load_pipeline``), one PNG per
image — one video file per video — and a JSON with the exact settings beside each.

    twinflow generate --model qwen-image --model-path TwinFlow-Qwen-Image --prompt "a cat" \\
        --steps 2 --seed 42 --height 1024 --width 768 --output-dir out/
    twinflow generate --model wan --model-path my-twinflow-wan --prompt "a cat" --num-frames 33 --fps 16

Image ``k`` of prompt ``p`` is ``{p:03d}-{k:02d}.png`` (a video ``{p:03d}-{k:02d}.mp4``, or
``.webp`` / ``.gif``: ``--video-format``); every prompt's images come from one
pipeline call with ``torch.Generator("cpu").manual_seed(seed)``, so the same settings give the
same images. diffusers is imported only when the command runs (``twinflow --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import List

from tqdm.auto import tqdm

from .diffusers_patch import BACKBONES as _BACKBONES  # names only: diffusers is not imported

from .cli import positive_int, register_command
from .quantization import QUANTIZE_CHOICES


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, choices=tuple(_BACKBONES),
                   help="backbone of the checkpoint; default: what the folder records (pipelines saved by twinflow)")
    p.add_argument("--model-path", required=True,
                   help="diffusers pipeline folder (model_index.json, transformer/, ...) or Hugging Face Hub repo "
                        "id org/name (from the Hub cache; HF_HUB_OFFLINE=1 reads the cache only)")
    p.add_argument("--subfolder", default=None, help="the pipeline folder inside --model-path")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a repo id")
    p.add_argument("--transformer", default=None, metavar="PATH",
                   help="the TwinFlow transformer from another folder or repo id (a transformer folder, as the "
                        "published training saves it) or a GGUF file (local or org/name/file.gguf); --model-path is then "
                        "the base pipeline")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=pathlib.Path, help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None, help="used only with --guidance-scale > 1")
    p.add_argument("--steps", type=positive_int, default=2,
                   help="sampling steps (= NFE): 1 → the 1-NFE preset, 2 → 2-NFE, 3 or more → the 4-NFE settings")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--height", type=positive_int, default=None,
                   help="image height in pixels (the pipelines need multiples of 16, Sana of 32); default 1024, "
                        "for a video family its pipeline's (Wan: 480)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="image width in pixels; default 1024, for a video family its pipeline's (Wan: 832)")
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help="video families: frames per video (Wan: 4k + 1, default 81)")
    p.add_argument("--fps", type=positive_int, default=None,
                   help="video families: frame rate of the written video (Wan: default 16)")
    p.add_argument("--video-format", choices=VIDEO_FORMATS, default=None,
                   help="video families: mp4 (needs imageio and imageio-ffmpeg), webp (animated, lossless) or gif; "
                        "default mp4 when imageio-ffmpeg is installed, else webp")
    p.add_argument("--num-images", type=positive_int, default=1,
                   help="images per prompt; image k of a prompt uses seed --seed + k")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="prompts per transformer call (each image keeps its own seed, so the images do not "
                        "depend on it); under torchrun each process takes every N-th prompt")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance (true_cfg_scale for Qwen-Image); 1 = off, as TwinFlow models run")
    p.add_argument("--mode", choices=("aux", "lora"), default=None,
                   help="target-time conditioning (docs/algorithm.md §4); default: what the checkpoint records, else aux")
    p.add_argument("--output-dir", type=pathlib.Path, default=pathlib.Path("out/generate"),
                   help="where {prompt:03d}-{image:02d}.png and .json go (created if missing)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--aux-weights", default=None, metavar="PATH",
                   help="with a GGUF --transformer that lacks the aux target-time embedder: a safetensors file or "
                        "transformer folder holding it")
    p.add_argument("--image", type=pathlib.Path, default=None, metavar="FILE",
                   help="a local input image. Editing families (qwen-image-edit, qwen-image-edit-plus, "
                        "flux-kontext): the reference image every prompt edits (required; the pipeline resizes it "
                        "itself). Other families: image-to-image, the image resized to --height × --width and the "
                        "family's Img2Img pipeline (diffusers' AutoPipelineForImage2Image mapping)")
    p.add_argument("--strength", type=float, default=None,
                   help="image-to-image (not editing) with --image: how much of the TwinFlow steps to run, in "
                        "(0, 1] (default 0.6)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                   help="weight quantization of the transformer and text encoders (the time embedders stay "
                        "unquantized): int8 / fp8 = torchao weight-only (CPU or GPU), nf4 / bnb-int8 = "
                        "bitsandbytes (CUDA); see twinflow.quantization")
    p.add_argument("--offload", default="none", choices=OFFLOAD_CHOICES,
                   help="keep weights off the device between uses: model = diffusers' model CPU offload "
                        "(one component at a time), sequential = per layer, group = diffusers' leaf-level group "
                        "offloading (with CUDA streams on CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


#: what ``--offload`` takes
OFFLOAD_CHOICES = ("none", "model", "sequential", "group")


def apply_offload(pipe, offload: str, device) -> None:
    """Turn on one of diffusers' offloading modes on a loaded pipeline (it stays on the CPU and
    its parts are moved to `device` when they run)."""
    import torch

    device = torch.device(device)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload == "group":
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=device.type == "cuda")
    elif offload != "none":
        raise ValueError(f"--offload: expected one of {', '.join(OFFLOAD_CHOICES)}, got {offload!r}")


def _distributed(device):
    """(rank, world size): under torchrun (WORLD_SIZE > 1) joins the process group (nccl on CUDA,
    else gloo) so that rank 0 can count every process's images; (0, 1) otherwise."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


#: what ``--video-format`` takes
VIDEO_FORMATS = ("mp4", "webp", "gif")


def _strength(args: argparse.Namespace):
    """--strength for --image (default 0.6), checked before anything loads; None without --image."""
    if args.image is None:
        if args.strength is not None:
            raise ValueError("--strength: applies to image-to-image; give --image FILE")
        return None
    strength = 0.6 if args.strength is None else args.strength
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"--strength: must be in (0, 1], got {strength}")
    return strength


def _read_image(args: argparse.Namespace, size=None):
    """--image as an RGB PIL image (a local file only), resized to `size` (w, h) if given."""
    from PIL import Image, UnidentifiedImageError

    from . import _files

    try:
        _files.regular_file(args.image)
        with Image.open(args.image) as im:
            image = im.convert("RGB")
            return image.resize(size) if size is not None else image.copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"--image: cannot read {args.image} as an image ({e})") from e


def _image_args(args: argparse.Namespace, height: int, width: int) -> dict:
    """{"image": PIL image, "strength": s} for --image (a local file only), else {}."""
    strength = _strength(args)
    if args.image is None:
        return {}
    return {"image": _read_image(args, (width, height)), "strength": strength}


def _reference_args(args: argparse.Namespace, family) -> dict:
    """{"reference": PIL image} for an editing family: --image is the image every prompt edits."""
    if args.image is None:
        raise ValueError(f"--image: {family.name} edits an input image; give the reference image with --image FILE")
    if args.strength is not None:
        raise ValueError(f"--strength: applies to image-to-image; {family.name} edits --image (it is the reference, "
                         "not a starting point)")
    return {"reference": _read_image(args)}


def _model_name(args: argparse.Namespace):
    """--model, or the backbone the folder records; None when neither says."""
    from .pipelines import resolve_model_path
    from .saved_format import read_folder_record

    if args.model is not None:
        return args.model
    record = read_folder_record(resolve_model_path(args.model_path, subfolder=args.subfolder, revision=args.revision))
    return record["backbone"] if record else None


def _mp4_writer() -> bool:
    """Whether diffusers' ``export_to_video`` can write mp4 here (imageio with its ffmpeg)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("imageio", "imageio_ffmpeg"))


def _video_settings(bb, args: argparse.Namespace) -> dict:
    """{"num_frames", "fps", "video_format"} for a video family; {} for an image family, which
    refuses the video options (and a video family refuses --image)."""
    given = [f"--{k.replace('_', '-')}" for k in ("num_frames", "fps", "video_format") if getattr(args, k) is not None]
    if not bb.video:
        if given:
            video = [n for n, b in _family_list() if b.video]
            raise ValueError(f"{', '.join(given)}: {bb.name} is an image family (it writes PNG images); video options "
                             f"apply to video families ({', '.join(video)})")
        return {}
    if args.image is not None:
        raise ValueError(f"--image: {bb.name} is a video family (text-to-video); image-to-image applies to image "
                         "families")
    frames = bb.default_num_frames if args.num_frames is None else args.num_frames
    bb.check_num_frames(frames, "--num-frames")
    fmt = args.video_format or ("mp4" if _mp4_writer() else "webp")
    if fmt == "mp4" and not _mp4_writer():
        raise ValueError("--video-format mp4: needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg), "
                         "which are not installed; use --video-format webp or gif")
    return {"num_frames": frames, "fps": bb.default_fps if args.fps is None else args.fps, "video_format": fmt}


def _family_list():
    from . import diffusers_patch

    return diffusers_patch.backbones().items()


def write_video(frames, path: pathlib.Path, fps: int, video_format: str) -> None:
    """Frames [F, H, W, 3] in [0, 1] (float) → an mp4 (diffusers' ``export_to_video``), or an
    animated lossless WebP / a GIF through PIL, looping, at `fps`."""
    import numpy as np

    if video_format == "mp4":
        from diffusers.utils import export_to_video

        export_to_video(list(frames), str(path), fps=fps)
        return
    from PIL import Image

    images = [Image.fromarray(f) for f in (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)]
    kw = dict(lossless=True) if video_format == "webp" else dict(optimize=False)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, **kw)


def _img2img_class(args: argparse.Namespace) -> str:
    """The Img2Img pipeline class of the checkpoint's family (diffusers' own mapping)."""
    from diffusers.pipelines.auto_pipeline import AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, _get_task_class

    from . import diffusers_patch

    model = _model_name(args)
    if model is None:
        raise ValueError("--image: give --model (the folder records no backbone)")
    if diffusers_patch.backbone(model).video:
        raise ValueError(f"--image: {model} is a video family (text-to-video); image-to-image applies to image "
                         "families")
    base = diffusers_patch.backbone(model).pipeline_class_name
    cls = _get_task_class(AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, base, throw_error_if_not_exist=False)
    if cls is None:
        raise ValueError(f"--image: diffusers has no image-to-image pipeline for {base}")
    return cls.__name__


def _prompts(args: argparse.Namespace) -> List[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"--prompts-file: cannot read {args.prompts_file} ({e.strerror or e})") from e
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT or --prompts-file FILE")
    return prompts


def _describe(path: str) -> str:
    """A local folder as its absolute path, a Hub repo id as given."""
    local = pathlib.Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def _extra_call_args(model: str, args: argparse.Namespace, height: int, width: int) -> dict:
    from . import diffusers_patch

    bb = diffusers_patch.backbone(model)
    kw = {bb.cfg_kwarg: args.guidance_scale, **bb.exact_size_kwargs(height, width)}
    if args.guidance_scale > 1 and args.negative_prompt is not None:
        kw["negative_prompt"] = args.negative_prompt
    return kw


@register_command(
    "generate", add_arguments=_add_generate_arguments,
    help="generate images (videos for a video family) from a TwinFlow checkpoint folder (diffusers pipeline)",
    description=("Loads a TwinFlow checkpoint (a diffusers pipeline folder) with twinflow.load_pipeline and "
                 "writes one PNG per image (one video file per video) and a JSON with the exact settings beside "
                 "it."),
)
def _run_generate(args: argparse.Namespace) -> int:
    from ._logging import no_library_progress_bars

    with no_library_progress_bars(args.quiet):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    import os

    import numpy as np
    import torch

    from . import MAX_SAMPLING_STEPS, __version__
    from .pipelines import load_pipeline, resolve_device

    if args.steps > MAX_SAMPLING_STEPS:
        raise ValueError(f"--steps: must be at most {MAX_SAMPLING_STEPS}, got {args.steps}")
    from . import diffusers_patch

    prompts = _prompts(args)
    try:
        named = _model_name(args)
    except (FileNotFoundError, ValueError):  # load_pipeline reports what is wrong with the folder
        named = None
    family = diffusers_patch.backbone(named) if named is not None else None
    editing = family is not None and family.edit
    # refuse mismatched options (image, strength, video) before loading anything
    reference_kw = _reference_args(args, family) if editing else {}
    if not editing:
        _strength(args)
    if family is not None:
        _video_settings(family, args)
    device = resolve_device(args.device)
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(local_rank))  # torchrun: one GPU per process
    dtype = ({"cuda": torch.bfloat16}.get(device.type, torch.float32) if args.dtype == "auto"
             else getattr(torch, args.dtype))
    try:
        pipe = load_pipeline(args.model_path, args.model, dtype=dtype, device=device if args.offload == "none" else None,
                             mode=args.mode, transformer=args.transformer, subfolder=args.subfolder,
                             revision=args.revision, aux_weights=args.aux_weights,
                             pipeline_class=_img2img_class(args) if args.image is not None and not editing else None,
                             quantization_config=None if args.quantize == "none" else args.quantize)
    except (FileNotFoundError, ImportError) as e:  # the registry reports ValueError as a one-line error
        raise ValueError(str(e)) from e
    apply_offload(pipe, args.offload, device)
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    out_dir: pathlib.Path = args.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output-dir: cannot create {out_dir} ({e.strerror or e})") from e
    model = pipe.config["_twinflow"]["backbone"]  # --model, or what the folder records
    bb = diffusers_patch.backbone(model)
    video = _video_settings(bb, args)
    height = args.height or bb.default_size[0]
    width = args.width or bb.default_size[1]
    image_kw = reference_kw if editing else _image_args(args, height, width)
    extra = _extra_call_args(model, args, height, width)
    settings = {
        "command": "generate", "model": model,
        "model_path": _describe(args.model_path), "subfolder": args.subfolder, "revision": args.revision,
        "transformer": None if args.transformer is None else _describe(args.transformer),
        "aux_weights": None if args.aux_weights is None else _describe(args.aux_weights),
        "mode": pipe.config["_twinflow"]["mode"], "steps": args.steps,
        "height": height, "width": width, "seed": args.seed, "num_images": args.num_images, **video,
        "negative_prompt": extra.get("negative_prompt"), "guidance_scale": args.guidance_scale,
        "batch_size": args.batch_size,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "quantize": args.quantize, "offload": args.offload,
        "input_image": None if args.image is None else str(args.image.resolve()),
        "image_role": None if args.image is None else "reference" if editing else "img2img",
        "strength": image_kw.get("strength"),
        "twinflow_version": __version__, "torch_version": torch.__version__,
    }
    import diffusers

    settings["diffusers_version"] = diffusers.__version__
    rank, world = _distributed(device)
    mine = [(p, prompt) for p, prompt in enumerate(prompts) if p % world == rank]  # prompt p → rank p mod N
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    written = 0
    # The pipeline shows a bar over its steps; this one counts batches when there are several.
    for batch in tqdm(batches, desc="batches", unit="batch",
                      disable=True if args.quiet or len(batches) < 2 else None):
        t0 = time.perf_counter()
        # one generator per image, seeded --seed + k: an image is the same whatever the batch or process count
        generators = [torch.Generator("cpu").manual_seed(args.seed + k) for _ in batch for k in range(args.num_images)]
        call = {**extra, **image_kw}
        if editing:  # the pipeline's image argument for this batch's prompts
            call["image"] = bb.reference_arg(pipe, call.pop("reference"), len(batch))
        if "negative_prompt" in call:  # one per prompt of the batch
            call["negative_prompt"] = [call["negative_prompt"]] * len(batch)
        if video:  # diffusers' video pipelines: num_frames, num_videos_per_prompt, .frames [N, F, H, W, 3]
            call.update(num_frames=video["num_frames"], num_videos_per_prompt=args.num_images)
        else:
            call["num_images_per_prompt"] = args.num_images
        out = pipe(prompt=[prompt for _, prompt in batch], height=height, width=width,
                   num_inference_steps=args.steps, generator=generators, output_type="np", **call)
        array = out.frames if video else out.images
        if not np.isfinite(array).all():  # e.g. NaN weights in the VAE: never write a blank image
            raise ValueError(f"prompts {[p for p, _ in batch]}: the decoded images contain NaN or Inf (corrupt "
                             f"weights in {args.model_path}?); nothing written for them")
        images = list(array) if video else pipe.numpy_to_pil(array)
        wall = time.perf_counter() - t0
        # The config after the call holds the preset settings this step count used.
        scheduler = {"class": type(pipe.scheduler).__name__,
                     **{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}}
        for j, image in enumerate(images):
            (p, prompt), k = batch[j // args.num_images], j % args.num_images
            stem = f"{p:03d}-{k:02d}"
            if video:
                name = f"{stem}.{video['video_format']}"
                write_video(image, out_dir / name, video["fps"], video["video_format"])
                what = {"video": name, "frames": int(image.shape[0])}
            else:
                name = f"{stem}.png"
                image.save(out_dir / name)
                what = {"image": name}
            record = {**settings, "prompt": prompt, "prompt_index": p, "image_index": k, **what,
                      "image_seed": args.seed + k, "batch": [q for q, _ in batch], "rank": rank, "world_size": world,
                      "scheduler": scheduler, "wall_time_s": round(wall, 4)}
            (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2, default=list) + "\n")
            written += 1
    if world > 1:
        import torch.distributed as dist

        counts = [None] * world
        dist.all_gather_object(counts, written)
        dist.destroy_process_group()
        if rank != 0:
            return 0
        written = sum(counts)
    kind = f"videos ({video['video_format']} + JSON)" if video else "images (PNG + JSON)"
    print(f"wrote {written} {kind} to {out_dir}")
    return 0
