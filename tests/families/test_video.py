"""The video family Wan (``WanPipeline``) end to end on tiny random-weight pipelines
(``twinflow.tiny.build_wan``: Wan 2.1, Wan 2.2 A14B with two experts, Wan 2.2 TI2V 5B), CPU.

1. 2-step generation through the stock WanPipeline with a TwinFlowScheduler equals the trainer's
   model call (``TwinFlowModel`` → ``Wan.call``) sampled with UnifiedSampler on the same noise,
   for one timestep per row (2.1) and per-token timesteps (2.2 TI2V): the time conventions agree;
2. save_pretrained → load_pipeline gives identical frames (aux and LoRA mode), and a LoRA in
   diffusers' layout loads onto the base with ``lora=`` to the same frames;
3. Wan 2.2 A14B: loading keeps the high-noise expert alone (transformer_2 and boundary_ratio
   dropped, with a warning); a pipeline still routing by boundary_ratio, or transformer_2 passed
   in, is refused; ``twinflow train`` trains that expert and exports without transformer_2;
4. ``twinflow generate --model wan`` writes the video (animated WebP without imageio, GIF on
   request, mp4 with imageio-ffmpeg or a clear refusal) and its JSON; video options for an image
   family and --image for a video family are refused;
5. one TwinFlow step on 5-D latents (full: aux-embedder grads; LoRA with the config's targets:
   adapter grads only); the objective on [B, C, F, h, w] equals it on frames folded into channels;
6. data: clip folders (frames + caption), stride, images as 1-frame clips, and their errors;
7. bad inputs: 4-D latents, frame counts the VAE cannot encode, a Wan checkpoint loaded as
   another family.
"""

from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from checks import expect_error
from tiny_pipelines import TEST_SIZE as SIZE, one_thread, saved_pipeline  # noqa: F401 (autouse fixture)
import twinflow
from twinflow import TwinFlowLoss, TwinFlowScheduler, UnifiedSampler, diffusers_patch
from twinflow.cli import main
from twinflow.diffusers_patch import backbone
from twinflow.tiny import build_wan
from twinflow.training.data import ClipFolderDataset, open_dataset
from twinflow.training.models import TwinFlowModel

WAN = backbone("wan")
FRAMES = 5  # pixel frames (2 latent frames)
CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _frames(pipe, steps=2, seed=0, frames=FRAMES):
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt="a cat", height=SIZE, width=SIZE, num_frames=frames, num_inference_steps=steps,
                    guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(seed)).frames


def _count_calls(transformer):
    calls = []
    transformer.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _trained_looking(transformer):
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for n, p in transformer.named_parameters():
            if n.startswith(WAN.aux_prefix):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan22") / "a14b"
    build_wan("2.2-a14b").save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("variant", ["2.1", "2.2-ti2v"])
def test_two_step_generation_is_the_trainers_model_call(variant):
    pipe = build_wan(variant)
    diffusers_patch.patch(pipe.transformer, "wan")
    _trained_looking(pipe.transformer)  # so that tt ≠ t matters
    settings = dict(stochast_ratio=0.0, rfba_gap_steps=(0.001, 0.6), sampling_style="few")
    pipe.scheduler = TwinFlowScheduler(**settings)
    diffusers_patch.set_target_time(pipe.transformer, pipe)
    channels, side = pipe.transformer.config.in_channels, SIZE // pipe.vae_scale_factor_spatial
    noise = torch.randn(1, channels, 2, side, side, generator=torch.Generator().manual_seed(0))
    calls = _count_calls(pipe.transformer)
    with torch.no_grad():
        stock = pipe("a tiny clip", num_inference_steps=2, height=SIZE, width=SIZE, num_frames=FRAMES,
                     guidance_scale=1.0, output_type="latent", latents=noise.clone()).frames
        assert len(calls) == 2 and stock.shape == noise.shape
        embeds = WAN.encode_text(pipe, ["a tiny clip"], torch.device("cpu"))
        ours = UnifiedSampler(sampling_steps=2, **settings).sample(TwinFlowModel(pipe.transformer, WAN), noise,
                                                                   cond=[embeds["prompt_embeds"]])
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
    frames = WAN.decode_latents(pipe.vae, stock)
    assert frames.shape == (1, 3, FRAMES, SIZE, SIZE) and torch.isfinite(frames).all()


@pytest.mark.exact
@pytest.mark.parametrize("mode", ["aux", "lora"])
def test_save_load_round_trip_gives_identical_frames(mode, tmp_path):
    layout = "aux" if mode == "aux" else "stock"
    pipe = twinflow.load_pipeline(saved_pipeline("wan", layout), "wan", mode=mode)
    calls = _count_calls(pipe.transformer)
    want = _frames(pipe)
    assert want.shape == (1, FRAMES, 3, SIZE, SIZE) and len(calls) == 2
    pipe.save_pretrained(tmp_path / "saved")
    again = twinflow.load_pipeline(tmp_path / "saved")  # backbone and mode from the record
    assert again.config["_twinflow"]["backbone"] == "wan" and again.config["_twinflow"]["mode"] == mode
    assert torch.equal(_frames(again), want)


NO_AUX = "ignore:.*no aux target-time weights:UserWarning"  # a stock base: the aux embedder starts as the copy


@pytest.mark.exact
def test_lora_in_diffusers_layout_loads_onto_the_base(tmp_path):
    """A LoRA-mode adapter (the config's targets, the timestep MLP among them) saved in diffusers'
    layout (what ``twinflow train`` exports) loads onto the stock base with ``lora=`` and gives
    the frames of the pipeline that held it."""
    from twinflow import lora_files
    from twinflow.training.config import load_config
    from twinflow.training.models import add_lora

    base = saved_pipeline("wan", "stock")
    pipe = twinflow.load_pipeline(base, "wan", mode="lora")
    add_lora(pipe.transformer, load_config(CONFIGS / "wan_lora_1order.yaml", ["lora.rank=4"]).lora, "online")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for n, p in pipe.transformer.named_parameters():
            if ".lora_B." in n:  # gaussian init leaves B = 0 (no change yet)
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    want = _frames(pipe)
    lora_files.save(tmp_path / "lora", pipe.transformer, "online", "wan")
    loaded = twinflow.load_pipeline(base, lora=tmp_path / "lora")  # backbone and mode from its record
    assert loaded.config["_twinflow"] == pipe.config["_twinflow"]
    assert torch.equal(_frames(loaded), want)
    assert not torch.allclose(_frames(twinflow.load_pipeline(base, "wan", mode="lora")), want, atol=1e-3)


@pytest.mark.filterwarnings(NO_AUX)
def test_wan22_a14b_runs_the_high_noise_expert_alone(a14b):
    with pytest.warns(UserWarning, match="high-noise expert"):
        pipe = twinflow.load_pipeline(a14b, "wan")
    assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    from safetensors.torch import load_file

    saved = load_file(a14b / "transformer" / "diffusion_pytorch_model.safetensors")
    other = load_file(a14b / "transformer_2" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(pipe.transformer.proj_out.weight, saved["proj_out.weight"])
    assert not torch.equal(saved["proj_out.weight"], other["proj_out.weight"])
    calls = _count_calls(pipe.transformer)
    assert torch.isfinite(_frames(pipe)).all() and len(calls) == 2  # every step, t = 1 and below the boundary
    # refused: the second expert passed in, and a pipeline that routes steps by the boundary
    with pytest.warns(UserWarning, match="high-noise expert"):
        expect_error(ValueError, lambda: twinflow.load_pipeline(a14b, "wan", transformer_2=pipe.transformer),
                     contains=("transformer_2", "not used"))
    stock = build_wan("2.2-a14b")
    diffusers_patch.patch(stock.transformer, "wan")
    expect_error(ValueError, lambda: diffusers_patch.set_target_time(stock.transformer, stock),
                 contains=("boundary_ratio=0.875", "transformer_2", "load_pipeline"))


# ----------------------------------------------------------------------------- generate CLI

def _argv(out, *extra, model_path=None):
    return ["generate", "--model", "wan", "--model-path", str(model_path or saved_pipeline("wan", "aux")),
            "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu", "--output-dir", str(out),
            "--prompt", "a cat", "--quiet", *extra]


def test_generate_writes_the_video_and_its_settings(tmp_path):
    from twinflow.generate import _mp4_writer

    assert main(_argv(tmp_path / "webp", "--num-frames", str(FRAMES), "--fps", "8", "--seed", "3",
                      "--video-format", "webp")) == 0
    assert sorted(p.name for p in (tmp_path / "webp").iterdir()) == ["000-00.json", "000-00.webp"]
    rec = json.loads((tmp_path / "webp" / "000-00.json").read_text())
    assert (rec["model"], rec["video"], rec["frames"], rec["num_frames"], rec["fps"], rec["seed"]) == (
        "wan", "000-00.webp", FRAMES, FRAMES, 8, 3)
    assert rec["video_format"] == "webp" and rec["steps"] == 2 and (rec["height"], rec["width"]) == (SIZE, SIZE)
    with Image.open(tmp_path / "webp" / "000-00.webp") as im:
        assert im.n_frames == FRAMES and im.size == (SIZE, SIZE)
        written = []
        for k in range(FRAMES):
            im.seek(k)
            written.append(np.asarray(im.convert("RGB")))
            assert im.info["duration"] == 125  # ms per frame at --fps 8
    # the frames load_pipeline makes with the same seed (lossless WebP: exact)
    pipe = twinflow.load_pipeline(saved_pipeline("wan", "aux"), "wan")
    want = (_frames(pipe, seed=3)[0].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.stack(written), want)

    assert main(_argv(tmp_path / "gif", "--num-frames", "1", "--video-format", "gif")) == 0
    with Image.open(tmp_path / "gif" / "000-00.gif") as im:
        assert im.n_frames == 1 and im.size == (SIZE, SIZE)
    if _mp4_writer():
        assert main(_argv(tmp_path / "mp4", "--num-frames", str(FRAMES), "--video-format", "mp4")) == 0
        assert (tmp_path / "mp4" / "000-00.mp4").stat().st_size > 0
    else:  # no mp4 writer installed: said so, and what to do
        assert main(_argv(tmp_path / "mp4", "--video-format", "mp4")) == 1


def test_generate_refuses_options_of_the_other_kind(tmp_path, capsys):
    missing = tmp_path / "never-read"  # every refusal comes before anything loads
    cases = [
        (["generate", "--model", "sd3", "--model-path", str(missing), "--prompt", "x", "--num-frames", "5"],
         ("--num-frames", "sd3 is an image family", "wan")),
        (["generate", "--model", "flux", "--model-path", str(missing), "--prompt", "x", "--fps", "8",
          "--video-format", "gif"], ("--fps, --video-format", "image family")),
        (_argv(tmp_path, "--num-frames", "8", model_path=missing), ("--num-frames", "4k + 1", "8")),
        (_argv(tmp_path, "--image", str(missing / "x.png"), model_path=missing), ("--image", "video family")),
    ]
    from twinflow.generate import _mp4_writer

    if not _mp4_writer():
        cases.append((_argv(tmp_path, "--video-format", "mp4", model_path=missing), ("imageio-ffmpeg", "webp")))
    for args, needles in cases:
        capsys.readouterr()
        assert main(args) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err and all(n in err[-1] for n in needles), err


# ----------------------------------------------------------------------------- training

def _batch(pipe, n=4):
    with torch.no_grad():
        embeds = WAN.encode_text(pipe, [f"clip {i}" for i in range(n)], torch.device("cpu"))
        null = WAN.encode_text(pipe, [""], torch.device("cpu"))
        pixels = torch.rand(n, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
        x = WAN.encode_latents(pipe.vae, pixels, None)
    return x, [embeds["prompt_embeds"]], [null["prompt_embeds"].expand(n, -1, -1)]


def test_one_training_step_full_and_lora():
    from twinflow.training.config import load_config
    from twinflow.training.models import add_lora

    pipe = build_wan()
    x, cond, uncond = _batch(pipe)
    assert x.shape == (4, 16, 2, SIZE // 8, SIZE // 8)
    full = copy.deepcopy(pipe.transformer)
    WAN.patch(full)
    loss_fn = TwinFlowLoss("twinflow", ema_decay_rate=0.0)
    loss = loss_fn(TwinFlowModel(full, WAN).train(), x, cond=cond, uncond=uncond,
                   generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and loss_fn.last_stats["model_calls"] == 6
    aux = [p for n, p in full.named_parameters() if n.startswith(WAN.aux_prefix)]
    assert aux and all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux)

    cfg = load_config(CONFIGS / "wan_lora_1order.yaml", ["lora.rank=4", "lora.alpha=4"])
    lora = pipe.transformer
    WAN.patch(lora, mode="lora")
    lora.requires_grad_(False)
    add_lora(lora, cfg.lora, "online")
    loss_fn = TwinFlowLoss("twinflow", **cfg.twinflow.settings())
    loss = loss_fn(TwinFlowModel(lora, WAN).train(), x, cond=cond, uncond=uncond,
                   generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)  # the base stays frozen
    emb = {n: g for n, g in grads.items() if "time_embedder" in n and ".lora_B." in n}
    assert emb and all(g is not None and g.abs().sum() > 0 for g in emb.values())


def test_the_objective_on_clips_is_the_objective_on_frames_in_channels():
    """TwinFlowLoss (its arithmetic in Rust) reads only the batch dimension: [B, C, F, h, w]
    latents give the step that [B, C·F, h, w] gives, draws and all."""
    pipe = build_wan()
    x, cond, uncond = _batch(pipe)
    WAN.patch(pipe.transformer)
    net = TwinFlowModel(pipe.transformer, WAN)

    def folded(x_t, t, tt, c=None):
        return net(x_t.view(x.shape[0] if x_t.shape[0] == x.shape[0] else -1, *x.shape[1:]), t, tt, c=c
                   ).reshape(x_t.shape)

    losses = []
    for model, data in ((net, x), (folded, x.flatten(1, 2))):
        with torch.no_grad():
            losses.append(TwinFlowLoss("twinflow", ema_decay_rate=0.0)(
                model, data, cond=cond, uncond=uncond, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(losses[0], losses[1])


@pytest.mark.filterwarnings(NO_AUX)
def test_twinflow_train_on_a_clip_folder_with_wan22_a14b(a14b, tmp_path):
    data = _clip_folder(tmp_path / "clips", clips=4)
    cfg = tmp_path / "wan.yaml"
    cfg.write_text(f"""\
model: {{name: wan, pretrained_model_name_or_path: {a14b}}}
training: {{batch_size: 4, max_steps: 1, mixed_precision: "no", checkpoint_every: 1, sample_every: 1}}
twinflow: {{recipe: twinflow, ema_decay_rate: 0.0, enhanced_ratio: 0.8, estimate_order: 1}}
sampling: {{num_images: 2}}
data: {{resolution: {SIZE}, num_workers: 0, num_frames: {FRAMES}}}
""")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="high-noise expert"):
        assert main(["train", "--config", str(cfg), "--dataset-path", str(data), "--output-dir", str(out),
                     "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    with Image.open(out / "samples" / "step-000001.png") as im:  # a row of 5 frames per clip
        assert im.size == (FRAMES * SIZE, 2 * SIZE)
    export = out / "pipeline"
    index = json.loads((export / "model_index.json").read_text())
    assert not (export / "transformer_2").exists()
    assert index["transformer_2"] == [None, None] and index["boundary_ratio"] is None
    pipe = twinflow.load_pipeline(export)
    assert pipe.transformer_2 is None and torch.isfinite(_frames(pipe)).all()


# ----------------------------------------------------------------------------- data

def _clip_folder(root: pathlib.Path, clips=2, frames=6, images=0) -> pathlib.Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(clips):
        d = root / "clips" / f"walk{i}"
        d.mkdir(parents=True)
        for f in range(frames):
            Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(d / f"{f:04d}.png")
        (root / "clips" / f"walk{i}.txt").write_text(f"clip {i}\n")
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / f"still{i}.png")
        (root / f"still{i}.txt").write_text(f"still {i}")
    return root


def test_clip_folders_strides_and_images_as_one_frame_clips(tmp_path):
    from twinflow.training.data import load_image

    root = _clip_folder(tmp_path / "d", clips=2, frames=6, images=2)
    clips = ClipFolderDataset(root / "clips", SIZE, num_frames=FRAMES)
    item = clips[1]
    assert len(clips) == 2 and item["text"] == "clip 1" and item["pixel_values"].shape == (3, FRAMES, SIZE, SIZE)
    frames = sorted((root / "clips" / "walk1").iterdir())
    assert torch.equal(item["pixel_values"][:, 4], load_image(frames[4], SIZE))
    strided = ClipFolderDataset(root / "clips", SIZE, num_frames=3, frame_stride=2)[0]["pixel_values"]
    assert torch.equal(strided[:, 2], load_image(sorted((root / "clips" / "walk0").iterdir())[4], SIZE))
    # with num_frames 1 images and clips mix: every item is a 1-frame clip
    mixed = ClipFolderDataset(root, SIZE, num_frames=1)
    assert len(mixed) == 4 and {mixed[i]["pixel_values"].shape for i in range(4)} == {(3, 1, SIZE, SIZE)}
    assert sorted(mixed[i]["text"] for i in range(4)) == ["clip 0", "clip 1", "still 0", "still 1"]
    # an image (4-D pixels, as a parquet's image rows give) encodes as a 1-frame clip
    vae = build_wan().vae
    still = mixed[3]["pixel_values"]
    torch.testing.assert_close(WAN.encode_latents(vae, still[None, :, 0], None), WAN.encode_latents(vae, still[None],
                                                                                                   None))
    assert WAN.encode_latents(vae, still[None], None).shape == (1, 16, 1, SIZE // 8, SIZE // 8)


def test_clip_data_errors(tmp_path):
    import types

    root = _clip_folder(tmp_path / "d", clips=1, frames=6, images=1)
    expect_error(ValueError, lambda: ClipFolderDataset(root / "clips", SIZE, num_frames=9),
                 contains=("walk0", "6 frames", "9"))
    expect_error(ValueError, lambda: ClipFolderDataset(root, SIZE, num_frames=5),
                 contains=("1 images", "1-frame clips", "data.num_frames: 1"))
    (root / "still0.txt").unlink()
    expect_error(ValueError, lambda: ClipFolderDataset(root, SIZE, num_frames=1), contains=("still0.txt",))
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "clip.mp4").write_bytes(b"\0")
    expect_error(ValueError, lambda: ClipFolderDataset(tmp_path / "v", SIZE, num_frames=1),
                 contains=("clip.mp4", "video reader", "frames"))
    (tmp_path / "e").mkdir()
    expect_error(ValueError, lambda: ClipFolderDataset(tmp_path / "e", SIZE, num_frames=1), contains=("no clips",))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "x", "image_bytes": b"\0"}]), tmp_path / "d.parquet")
    cfg = types.SimpleNamespace(resolution=SIZE, caption_column="text", image_column="image_bytes", num_frames=5,
                                frame_stride=1)
    expect_error(ValueError, lambda: open_dataset(tmp_path / "d.parquet", cfg, video=True),
                 contains=("1-frame clips", "data.num_frames"))
    from twinflow.training.config import parse_config

    expect_error(ValueError, lambda: parse_config({"model": {"name": "wan", "pretrained_model_name_or_path": "x"},
                                                   "data": {"num_frames": 8}}, "c.yaml"),
                 contains=("c.yaml", "data.num_frames", "4k + 1", "8"))


# ----------------------------------------------------------------------------- bad inputs

def test_bad_inputs_are_refused():
    pipe = build_wan()
    t = torch.tensor([0.5])
    cond = [torch.randn(1, 5, 32)]
    expect_error(ValueError, lambda: WAN.call(pipe.transformer, torch.randn(1, 16, 4, 4), t, cond),
                 contains=("[B, C, F, h, w]", "[1, 16, 4, 4]"))
    expect_error(ValueError, lambda: WAN.call(pipe.transformer, torch.randn(1, 16, 2, 5, 4), t, cond),
                 contains=("multiples of the patch size", "16"))
    expect_error(ValueError, lambda: WAN.call(pipe.transformer, torch.randn(1, 4, 2, 4, 4), t, cond),
                 contains=("16 channels",))
    expect_error(ValueError, lambda: WAN.encode_latents(pipe.vae, torch.zeros(1, 3, 8, SIZE, SIZE), None),
                 contains=("4k + 1", "8"))
    expect_error(ValueError, lambda: WAN.encode_latents(pipe.vae, torch.zeros(3, SIZE, SIZE), None),
                 contains=("[B, 3, F, H, W]",))


def test_a_wan_checkpoint_loaded_as_another_family_names_both(tmp_path):
    expect_error(ValueError, lambda: twinflow.load_pipeline(saved_pipeline("wan", "aux"), "sd3"),
                 contains=("WanTransformer3DModel", "SD3Transformer2DModel"))
    pipe = twinflow.load_pipeline(saved_pipeline("wan", "aux"), "wan")
    pipe.save_pretrained(tmp_path / "saved")  # records the backbone
    expect_error(ValueError, lambda: twinflow.load_pipeline(tmp_path / "saved", "flux"),
                 contains=("flux", "TwinFlow wan checkpoint"))
