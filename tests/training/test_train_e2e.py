"""``twinflow train`` end to end on CPU (gloo): tiny random-weight SD3 and Qwen-Image pipelines
saved with save_pretrained (tests/tiny_pipelines.py, real text encoders and VAEs) and loaded
through the trainer's own loading path, on a tiny parquet made here.

What is checked:

1. one process, full fine-tuning, images + captions (text encoders and VAE in the loop):
   checkpoint layout (aux keys inside the diffusers safetensors, EMA copy, marker), per-term
   loss stats in metrics.jsonl, a sample grid, and the exported pipeline loads with
   ``twinflow.load_pipeline`` and generates with 2 transformer calls;
2. ``torchrun --nproc_per_node=2`` with DDP: the weights and the EMA teacher after two steps
   equal, bit for bit, one process with ``grad_accum_steps=2`` on the same micro-batches (the
   parquet is reordered so that its consecutive micro-batches are the ranks' shards);
3. the same with FSDP2 (``fully_shard``), to float tolerance; an FSDP2 run resumed from its
   step-1 checkpoint equals the uninterrupted one bit for bit;
4. LoRA (peft adapters, teacher = "old adapter") under DDP against one process, same way;
   the merged export records mode "lora" (loading it as "aux" is an error), and the adapter
   in diffusers' LoRA layout on the base gives the merged export's image;
5. Qwen-Image on precomputed latents + text embeddings (variable lengths, padded);
6. SIGKILL mid-run, ``--resume auto``: the result equals an uninterrupted run, and a folder
   without the completion marker is never loaded;
7. a corrupt checkpoint is refused with a clear message;
8. a non-finite loss stops the run (exit 3) and names the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch


from safetensors.torch import load_file  # noqa: E402
from tiny_pipelines import build, tiny_threads  # noqa: E402

from twinflow.cli import main  # noqa: E402
from twinflow.training.data import tensor_bytes  # noqa: E402

ROWS = 16
WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_TARGETS = "[to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj]"
# DDP/FSDP comparisons: no shuffling, 2 steps, no grids (speed).
COMPARE = ["training.max_steps=2", "data.shuffle=false", "training.sample_every=1000", "training.checkpoint_every=1"]


def _images_parquet(path: pathlib.Path, order=None) -> pathlib.Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(ROWS):  # odd sizes: resize + center-crop to the resolution
        img = Image.fromarray(rng.integers(0, 255, (20 + 4 * (i % 3), 18, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append({"text": f"picture number {i}", "image_bytes": buf.getvalue()})
    if order is not None:
        rows = [rows[i] for i in order]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    return path


def _shard_order(n: int, world: int, micro: int):
    """Rows so that one process's consecutive micro-batches are DistributedSampler's rank
    shards (unshuffled: rank r takes rows r, r + world, ...)."""
    order = []
    for start in range(0, n, world * micro):
        order += [start + r + world * j for r in range(world) for j in range(micro)]
    return order


def _config(tmp: pathlib.Path, model: str, folder: pathlib.Path, extra: str = "") -> pathlib.Path:
    path = tmp / f"{model}.yaml"
    path.write_text(f"""\
model: {{name: {model}, pretrained_model_name_or_path: {folder}}}
training: {{batch_size: 4, max_steps: 3, lr: {_LR}, mixed_precision: "no", checkpoint_every: 2,
            sample_every: 2, keep_last: 5, log_every: 1}}
twinflow: {{recipe: twinflow, ema_decay_rate: 0.99, enhanced_ratio: 0.8, estimate_order: 2}}
sampling: {{steps: 2, num_images: 4}}
data: {{resolution: 8, num_workers: 0}}
{extra}""")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    sd3 = tmp / "sd3-pipeline"
    build("sd3").save_pretrained(sd3)
    return {"tmp": tmp, "sd3": sd3, "cfg": _config(tmp, "sd3", sd3),
            "data": _images_parquet(tmp / "data.parquet"),
            "data_sharded": _images_parquet(tmp / "data_sharded.parquet", _shard_order(ROWS, 2, 4))}


def _train(cfg, data, out, *sets, resume=None) -> int:
    argv = ["train", "--config", str(cfg), "--dataset-path", str(data), "--output-dir", str(out), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    if resume:
        argv += ["--resume", resume]
    with _one_thread():
        return main(argv)


@contextlib.contextmanager
def _one_thread():
    """Run as the torchrun subprocesses do (OMP_NUM_THREADS=1, or the test thread count that
    tests/package/test_thread_counts.py also gives them): the same reduction order, so the same bits,
    and no OpenMP oversubscription on a busy 2-core machine (several times faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(tiny_threads())
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _torchrun(cfg, data, out, *sets, nproc=2, timeout=300, resume=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "twinflow", "train", "--config", str(cfg), "--dataset-path", str(data),
           "--output-dir", str(out), "--no-progress"] + (["--resume", resume] if resume else [])
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(tiny_threads()))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _weights(ckpt: pathlib.Path, sub: str = "transformer", name: str = WEIGHTS):
    return load_file(str(ckpt / sub / name))


def _metrics(out: pathlib.Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# ----------------------------------------------------------------------------- 1. one process

@pytest.fixture(scope="module")
def single(env):
    """One process, grad_accum_steps=2 on the shard-ordered parquet: the reference of the
    2-process runs (and the checks of a plain run)."""
    out = env["tmp"] / "single"
    assert _train(env["cfg"], env["data_sharded"], out, "training.grad_accum_steps=2", *COMPARE[:2]) == 0
    return out


def test_single_process_full(env, single):
    from twinflow import diffusers_patch

    ckpt = single / "checkpoints" / "step-000002"
    marker = json.loads((ckpt / "COMPLETE.json").read_text())
    assert {"transformer/" + WEIGHTS, "transformer_ema/" + WEIGHTS, "transformer/config.json",
            "trainer_state.pt", "rng_states.pt", "twinflow_train.json"} <= set(marker["files"])
    w, ema = _weights(ckpt), _weights(ckpt, "transformer_ema")
    prefix = diffusers_patch.module_for("sd3").AUX_PREFIX
    assert any(k.startswith(prefix) for k in w), "aux embedder keys missing from the transformer safetensors"
    stock = load_file(str(env["sd3"] / "transformer" / WEIGHTS))
    assert set(w) - set(stock) == {k for k in w if k.startswith(prefix)}
    assert any(not torch.equal(w[k], stock[k]) for k in stock), "training did not move the weights"
    assert any(not torch.equal(w[k], ema[k]) for k in w), "the EMA copy equals the online weights"
    m = _metrics(single)
    assert [r["step"] for r in m] == [1, 2]
    for r in m:
        assert {"loss", "base", "dist_match", "e2e", "mul", "any", "adv", "grad_norm", "images_per_s",
                "memory_mib"} <= set(r) and r["model_calls"] == 6 and np.isfinite(r["loss"])  # 8, two pairs batched
    assert m[0]["ema_decay"] == 0.0 and m[1]["ema_decay"] == pytest.approx(0.495)
    assert (single / "samples" / "step-000002.png").is_file()


def test_exported_pipeline_generates_with_2_nfe(single):
    import twinflow

    pipe = twinflow.load_pipeline(single / "pipeline")  # the export records model and mode
    with pytest.raises(ValueError, match="mode"):
        twinflow.load_pipeline(single / "pipeline", mode="lora")
    trained = _weights(single / "checkpoints" / "step-000002")
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, trained[k]), k  # aux keys included
    calls = []
    pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    with _one_thread():
        img = pipe("picture number 3", num_inference_steps=2, height=16, width=16, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all() and len(calls) == 2


# ----------------------------------------------------------------------------- 2, 3. DDP and FSDP2

@pytest.fixture(scope="module")
def two_processes(env):
    """`torchrun --nproc_per_node=2` runs by strategy, each made once."""
    runs = {}

    def run(strategy):
        if strategy not in runs:
            runs[strategy] = env["tmp"] / f"two-{strategy}"
            _torchrun(env["cfg"], env["data"], runs[strategy], f"training.strategy={strategy}", *COMPARE)
        return runs[strategy]
    return run


# FSDP2 keeps DTensor gradients, reduce-scattered and norm-clipped shard by shard: they agree
# with one process's only to rounding, δ ≈ one float32 ulp of the gradients' O(1e-3) terms
# (2^-23 · 1e-3 ≈ 1.2e-10). Adam's first step maps a gradient g to lr·g/(|g| + eps), whose
# slope peaks at 1/eps where g ≈ 0 (a gradient whose terms cancel: seen on the aux time
# embedder's sinusoidal inputs), so each step may move a weight by up to lr·δ/eps more or less.
# A sharding bug (a shard not updated or not reduced) moves weights by ~lr, 100× more; a wrong
# gradient scale, which Adam hides, is caught by the grad_norm comparison below.
_LR, _ADAM_EPS, _STEPS, _GRAD_ULP = 1e-3, 1e-8, 2, 2.0 ** -23 * 1e-3
FSDP_ATOL = _STEPS * _LR * _GRAD_ULP / _ADAM_EPS  # 2.4e-5


@pytest.mark.exact
@pytest.mark.parametrize("strategy, atol", [("ddp", 0.0), ("fsdp", FSDP_ATOL)])
def test_two_processes_match_one(env, single, two_processes, strategy, atol):
    out = two_processes(strategy)
    for sub in ("transformer", "transformer_ema"):
        _assert_same(_weights(single / "checkpoints" / "step-000002", sub),
                     _weights(out / "checkpoints" / "step-000002", sub), atol)
    a, b = _metrics(single), _metrics(out)
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-6)  # the all-reduced gradient


@pytest.mark.exact
def test_fsdp_resume_from_a_gathered_checkpoint(env, two_processes):
    """FSDP2: a checkpoint (full state dicts gathered on rank 0) loads back into the shards
    and the next step equals the uninterrupted run's, bit for bit."""
    first, resumed = two_processes("fsdp"), env["tmp"] / "fsdp-resumed"
    r = _torchrun(env["cfg"], env["data"], resumed, "training.strategy=fsdp", *COMPARE,
                  resume=str(first / "checkpoints" / "step-000001"))
    assert "resumed from" in r.stderr and "at step 1" in r.stderr
    assert f"the pipeline is in {resumed / 'pipeline'} (load it with twinflow.load_pipeline)" in r.stderr
    for sub in ("transformer", "transformer_ema"):
        _assert_same(_weights(first / "checkpoints" / "step-000002", sub),
                     _weights(resumed / "checkpoints" / "step-000002", sub))


# ----------------------------------------------------------------------------- 4. LoRA

@pytest.mark.exact
def test_lora_ddp_matches_one_process(env):
    lora = ["lora.enabled=true", f"lora.target_modules={LORA_TARGETS}", "lora.rank=4", "lora.alpha=4"]
    one, two = env["tmp"] / "lora-one", env["tmp"] / "lora-two"
    assert _train(env["cfg"], env["data_sharded"], one, "training.grad_accum_steps=2", *lora, *COMPARE) == 0
    _torchrun(env["cfg"], env["data"], two, *lora, *COMPARE)  # auto: DDP for LoRA
    ckpt = one / "checkpoints" / "step-000002"
    assert not (ckpt / "transformer").exists()
    cfg = json.loads((ckpt / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (4, 4, "gaussian")
    for sub in ("lora", "lora_teacher"):
        a = _weights(ckpt, sub, "adapter_model.safetensors")
        _assert_same(a, _weights(two / "checkpoints" / "step-000002", sub, "adapter_model.safetensors"))
        assert a and all("lora_" in k for k in a)
    online, teacher = (_weights(ckpt, s, "adapter_model.safetensors") for s in ("lora", "lora_teacher"))
    assert any(not torch.equal(online[k], teacher[k]) for k in online)
    import twinflow

    pipe = twinflow.load_pipeline(one / "pipeline", model="sd3", mode="lora")
    stock = load_file(str(env["sd3"] / "transformer" / WEIGHTS))
    merged = pipe.transformer.state_dict()
    assert set(merged) == set(stock)  # merged: stock keys, no aux embedder
    for a in (k for k in online if k.endswith(".lora_A.weight")):  # W + (α/r)·B·A, α = r
        layer = a[: -len(".lora_A.weight")]
        torch.testing.assert_close(merged[layer + ".weight"],
                                   stock[layer + ".weight"] + online[layer + ".lora_B.weight"] @ online[a])
    img = pipe("x", num_inference_steps=2, height=16, width=16, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(img).all()
    # the export records LoRA mode (loading it as aux is an error), and the adapter alone is
    # written in diffusers' LoRA layout: on the base it gives the merged model's image
    with pytest.raises(ValueError, match="mode"):
        twinflow.load_pipeline(one / "pipeline", mode="aux")
    adapter = twinflow.load_pipeline(env["sd3"], lora=one / "lora")
    again = adapter("x", num_inference_steps=2, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(again, img, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- 5. Qwen-Image, precomputed

def test_qwen_image_precomputed(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "qwen-pipeline"
    build("qwen-image").save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    rows = [{"latents": tensor_bytes({"latents": torch.randn(4, 4, 4, generator=g)}),
             "text_embeds": tensor_bytes({"prompt_embeds": torch.randn(3 + i % 4, 16, generator=g),
                                          "prompt_embeds_mask": torch.ones(3 + i % 4, dtype=torch.long)})}
            for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pre.parquet")
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.randn(1, 2, 16, generator=g),
               "prompt_embeds_mask": torch.ones(1, 2, dtype=torch.long)}, str(tmp_path / "null.safetensors"))
    cfg = _config(tmp_path, "qwen-image", folder)
    out = tmp_path / "run"
    assert _train(cfg, tmp_path / "pre.parquet", out) == 1  # guidance needs the empty prompt's embeddings
    assert "data.null_text_embeds" in capsys.readouterr().err
    assert _train(cfg, tmp_path / "pre.parquet", out, f"data.null_text_embeds={tmp_path / 'null.safetensors'}",
                  "training.max_steps=2") == 0
    w = _weights(out / "checkpoints" / "step-000002")
    assert {f"time_text_embed_2.timestep_embedder.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")} <= set(w)
    # 8 calls, the distribution-matching pair batched; the guidance pair stays two calls (the
    # empty prompt's embeddings are shorter than the batch's, so cond and uncond do not join)
    assert all(np.isfinite(r["loss"]) and r["model_calls"] == 7 for r in _metrics(out))
    assert (out / "samples" / "step-000002.png").is_file()


# ----------------------------------------------------------------------------- 6-8. resume, corrupt, NaN

def test_sigkill_and_resume_equals_uninterrupted(env):
    steps = ["training.max_steps=4", "training.sample_every=1000"]
    ref, killed = env["tmp"] / "uninterrupted", env["tmp"] / "killed"
    assert _train(env["cfg"], env["data"], ref, *steps) == 0
    cmd = [sys.executable, "-m", "twinflow", "train", "--config", str(env["cfg"]), "--dataset-path",
           str(env["data"]), "--output-dir", str(killed), "--no-progress"] + sum((["--set", s] for s in steps), [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    try:  # kill after step 3: checkpoint 2 is complete, step 3 is lost
        while time.time() < deadline and proc.poll() is None:
            m = killed / "metrics.jsonl"
            if m.is_file() and len(m.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert "step-000002" in done and "step-000004" not in done
    # a half-written save that was renamed without its marker must be ignored
    fake = killed / "checkpoints" / "step-000003"
    fake.mkdir(exist_ok=True)
    (fake / "trainer_state.pt").write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(env["cfg"], env["data"], killed, *steps, resume="auto") == 0
    stale = [str(w.message) for w in caught if "no aux target-time weights" in str(w.message)]
    assert not stale, "a resumed run loads trained aux weights: no 'initialised them' warning"
    final = killed / "checkpoints" / "step-000004"
    for sub in ("transformer", "transformer_ema"):
        _assert_same(_weights(ref / "checkpoints" / "step-000004", sub), _weights(final, sub))  # bit for bit
    a = torch.load(ref / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False)
    b = torch.load(final / "trainer_state.pt", weights_only=False)
    assert (a["step"], a["data_pass"], a["used_in_pass"]) == (b["step"], b["data_pass"], b["used_in_pass"])
    assert a["loss_fn"]["ema_updates"] == b["loss_fn"]["ema_updates"] == 4


def test_corrupt_and_incomplete_checkpoints_refused(env, single, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(single / "checkpoints", out / "checkpoints")
    f = out / "checkpoints" / "step-000002" / "transformer" / WEIGHTS
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte, same size
    f.write_bytes(bytes(data))
    assert _train(env["cfg"], env["data"], out, resume="auto") == 1
    err = capsys.readouterr().err
    assert "step-000002" in err and "corrupt" in err and "refusing" in err
    f.write_bytes(bytes(data[:-100]))  # truncated
    assert _train(env["cfg"], env["data"], out, resume="auto") == 1
    assert "bytes, expected" in capsys.readouterr().err
    (out / "checkpoints" / "step-000002" / "COMPLETE.json").unlink()
    assert _train(env["cfg"], env["data"], out, resume=str(out / "checkpoints" / "step-000002")) == 1
    assert "incomplete" in capsys.readouterr().err


def test_non_finite_loss_stops_with_last_good_checkpoint(env, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = _train(env["cfg"], env["data"], out, "training.lr=1e30", "training.checkpoint_every=1",
                "training.grad_clip=0", "training.sample_every=1000")
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "non-finite loss" in err and "step-000001" in err
    assert (out / "checkpoints" / "step-000001" / "COMPLETE.json").is_file()
    assert not (out / "pipeline").exists()


# ----------------------------------------------------------------------------- 8. QLoRA

def test_qlora_on_an_int8_base(env, tmp_path, capsys):
    """model.quantization: int8 (torchao, runs on the CPU) with LoRA and gradient checkpointing:
    the frozen base is quantized, the time embedder and the adapter are not, training runs and
    changes the adapter, and the merged export (base dequantized + adapter) loads and generates
    an image close to the adapter loaded onto the int8 base."""
    pytest.importorskip("torchao")
    import twinflow
    from twinflow import diffusers_patch, quantization
    from twinflow.training.config import load_config
    from twinflow.training.models import add_lora, load_transformer

    lora = ["lora.enabled=true", f"lora.target_modules={LORA_TARGETS}", "lora.rank=4", "lora.alpha=4"]
    sets = [*lora, "model.quantization=int8", "training.gradient_checkpointing=true", "training.max_steps=2",
            "training.checkpoint_every=2", "training.sample_every=100"]
    cfg = load_config(env["cfg"], sets)
    tr = load_transformer(cfg, diffusers_patch.backbone("sd3"), lora=True, frozen_dtype=torch.float32,
                          device=torch.device("cpu"))
    tr.requires_grad_(False)
    add_lora(tr, cfg.lora, "online")
    assert quantization.quantized_modules(tr)  # the frozen base
    assert quantization.quantized_modules(tr.time_text_embed) == []
    assert {n for n, p in tr.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in tr.named_parameters() if p.requires_grad)
    out = tmp_path / "q"
    assert _train(env["cfg"], env["data"], out, *sets) == 0
    assert all(math.isfinite(m["loss"]) for m in _metrics(out) if "loss" in m)
    adapter = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert adapter and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    merged = twinflow.load_pipeline(out / "pipeline", mode="lora")
    img = merged("x", num_inference_steps=2, height=16, width=16, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    on_int8 = twinflow.load_pipeline(env["sd3"], lora=out / "lora", quantization_config="int8")
    again = on_int8("x", num_inference_steps=2, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(img).all() and ((img - again).norm() / again.norm()) < 0.05


def test_qlora_and_8bit_adam_errors(env, tmp_path, capsys):
    cases = [(["model.quantization=int8"], "set lora.enabled: true"),
             (["model.quantization=int3"], "model.quantization"),
             (["training.optimizer=sgd"], "training.optimizer")]
    if not torch.cuda.is_available():
        cases.append((["training.optimizer=adamw8bit", "training.max_steps=1"], "runs on CUDA only"))
    for sets, needle in cases:
        capsys.readouterr()
        assert _train(env["cfg"], env["data"], tmp_path / "e", *sets) == 1, sets
        err = capsys.readouterr().err.strip().splitlines()
        assert err and needle in err[-1], (sets, err)
