"""``twinflow generate`` end to end on the saved tiny pipelines of ``tiny_pipelines``.

In process through ``twinflow.cli.main`` for every backbone (PNG + JSON settings, the same
image as ``load_pipeline`` with the same seed, several prompts and images, the one-line errors
with exit status 1), and once as ``python -m twinflow generate`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch


pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

import tiny_pipelines  # noqa: E402
from tiny_pipelines import one_thread  # noqa: E402,F401 (autouse fixture)
import twinflow  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.diffusers_patch import backbone  # noqa: E402

SIZE = tiny_pipelines.TEST_SIZE


def argv(model, out, *extra, layout="aux"):
    return ["generate", "--model", model, "--model-path", str(tiny_pipelines.saved_pipeline(model, layout)),
            "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu", "--output-dir", str(out), *extra]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("model", tiny_pipelines.PIPELINES)
def test_generate_writes_png_and_settings(model, tmp_path):
    # an editing family (FLUX Kontext here) edits --image: its pipeline resizes the reference itself
    ref = tmp_path / "ref.png"
    tiny_pipelines.reference_image().save(ref)
    image = ["--image", str(ref)] if backbone(model).edit else []
    out = tmp_path / "out"
    assert main(argv(model, out, "--prompt", "a cat dancing", "--steps", "1", "--seed", "3", *image)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000-00.json", "000-00.png"]
    img = pixels(out / "000-00.png")
    assert img.shape == (SIZE, SIZE, 3)
    rec = json.loads((out / "000-00.json").read_text())
    assert rec["model"] == model and rec["prompt"] == "a cat dancing" and rec["seed"] == 3 and rec["steps"] == 1
    assert rec["model_path"] == str(tiny_pipelines.saved_pipeline(model, "aux").resolve())
    assert rec["device"] == "cpu" and rec["dtype"] == "float32" and rec["twinflow_version"] == twinflow.__version__
    assert rec["scheduler"]["class"] == "TwinFlowPresetScheduler"
    assert rec["scheduler"]["stochast_ratio"] == 0.8 and rec["scheduler"]["rfba_gap_steps"] == [0.001, 0.7]
    assert rec["wall_time_s"] > 0 and rec["image"] == "000-00.png"
    assert rec["image_role"] == ("reference" if image else None) and rec["strength"] is None

    # the same image as load_pipeline with the same seed
    pipe = twinflow.load_pipeline(tiny_pipelines.saved_pipeline(model, "aux"), model)
    pipe.set_progress_bar_config(disable=True)
    edit = {"image": Image.open(ref).convert("RGB")} if image else {}
    want = pipe(prompt="a cat dancing", height=SIZE, width=SIZE, num_inference_steps=1, output_type="pil",
                generator=torch.Generator().manual_seed(3), **{backbone(model).cfg_kwarg: 1.0},
                **backbone(model).exact_size_kwargs(SIZE, SIZE), **edit).images[0]
    assert np.array_equal(img, np.asarray(want))


def test_prompts_file_and_several_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n  a blue bird  \n")
    out = tmp_path / "out"
    assert main(argv("sd3", out, "--prompt", "a cat", "--prompts-file", str(prompts), "--num-images", "2",
                     "--steps", "2")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{p:03d}-{k:02d}.{e}" for p in range(3) for k in range(2) for e in ("json", "png")]
    recs = [json.loads((out / f"{p:03d}-00.json").read_text()) for p in range(3)]
    assert [r["prompt"] for r in recs] == ["a cat", "a red fox", "a blue bird"]
    assert recs[0]["num_images"] == 2 and recs[0]["scheduler"]["stochast_ratio"] == 1.0
    assert not np.array_equal(pixels(out / "000-00.png"), pixels(out / "000-01.png"))
    # run again: the same files
    again = tmp_path / "again"
    assert main(argv("sd3", again, "--prompt", "a cat", "--prompts-file", str(prompts), "--num-images", "2",
                     "--steps", "2")) == 0
    for name in names:
        if name.endswith(".png"):
            assert np.array_equal(pixels(out / name), pixels(again / name)), name


def test_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["generate", "--model", "sd3", "--model-path", str(tmp_path / "missing"), "--prompt", "x"], "no such folder"),
        (argv("sd3", tmp_path / "o")[:-2] + ["--output-dir", str(tmp_path / "o")], "no prompt"),
        (argv("sd3", tmp_path / "o", "--prompts-file", str(tmp_path / "none.txt")), "--prompts-file"),
        (["generate", "--model", "sana", "--model-path", str(tiny_pipelines.saved_pipeline("sd3", "aux")),
          "--prompt", "x", "--device", "cpu"], "SanaTransformer2DModel"),
        (argv("sd3", tmp_path / "o", "--prompt", "x", "--device", "tpu7"), "device"),
    ]
    if not torch.cuda.is_available():
        cases.append((argv("sd3", tmp_path / "o", "--prompt", "x", "--device", "cuda"), "CUDA"))
    for args, needle in cases:
        capsys.readouterr()
        assert main(args) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("twinflow generate: error: ") and needle in err[-1], err


def test_model_comes_from_the_folder_when_it_records_it(tmp_path, capsys):
    """A pipeline saved by twinflow records its backbone: --model may be left out (as for
    load_pipeline); a stock folder without --model is a one-line error naming the choices."""
    pipe = twinflow.load_pipeline(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3")
    pipe.save_pretrained(tmp_path / "saved")
    common = ["--height", str(SIZE), "--width", str(SIZE), "--device", "cpu", "--prompt", "a cat", "--steps", "1"]
    assert main(["generate", "--model-path", str(tmp_path / "saved"), "--output-dir", str(tmp_path / "a"),
                 *common]) == 0
    assert json.loads((tmp_path / "a" / "000-00.json").read_text())["model"] == "sd3"
    assert main(argv("sd3", tmp_path / "b", "--prompt", "a cat", "--steps", "1")) == 0
    assert np.array_equal(pixels(tmp_path / "a" / "000-00.png"), pixels(tmp_path / "b" / "000-00.png"))
    capsys.readouterr()
    assert main(["generate", "--model-path", str(tiny_pipelines.saved_pipeline("sd3", "stock")),
                 "--output-dir", str(tmp_path / "c"), *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("twinflow generate: error: model: required (one of "), err


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "twinflow", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_python_m_twinflow_generate(tmp_path):
    r = _run(*argv("qwen-image", tmp_path, "--prompt", "a cat", "--steps", "4", "--seed", "1", "--dtype", "float32"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 1 images" in r.stdout
    assert pixels(tmp_path / "000-00.png").shape == (SIZE, SIZE, 3)
    rec = json.loads((tmp_path / "000-00.json").read_text())
    assert rec["steps"] == 4 and rec["scheduler"]["rfba_gap_steps"] == [0.001, 0.5]


def test_help_does_not_import_diffusers():
    code = "import sys, twinflow.cli as c; c.build_parser(); print('diffusers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_quantize_and_offload_options(tmp_path):
    """--quantize int8 (torchao, CPU) gives an image close to the float32 one; --offload model
    and group give the same image as none; both are recorded in the JSON."""
    pytest.importorskip("torchao")
    base = ("--prompt", "a cat", "--steps", "2", "--seed", "1")
    assert main(argv("qwen-image", tmp_path / "plain", *base)) == 0
    want = pixels(tmp_path / "plain" / "000-00.png").astype(float)
    for opts in (("--offload", "model"), ("--offload", "group")):
        out = tmp_path / opts[1]
        assert main(argv("qwen-image", out, *base, *opts)) == 0
        assert np.array_equal(pixels(out / "000-00.png"), want), opts
        assert json.loads((out / "000-00.json").read_text())["offload"] == opts[1]
    out = tmp_path / "int8"
    assert main(argv("qwen-image", out, *base, "--quantize", "int8")) == 0
    got = pixels(out / "000-00.png").astype(float)
    assert 0 < np.abs(got - want).mean() < 2.0  # out of 255: a broken path is tens
    assert json.loads((out / "000-00.json").read_text())["quantize"] == "int8"


def test_quantize_errors_are_one_line(tmp_path, capsys):
    cases = [(argv("sd3", tmp_path / "o", "--prompt", "x", "--quantize", "nf4"), "runs on cuda or xpu only")]
    for args, needle in cases:
        capsys.readouterr()
        assert main(args) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("twinflow generate: error: ") and needle in err[-1], err
    with pytest.raises(SystemExit):  # argparse: an unknown choice
        main(argv("sd3", tmp_path / "o", "--prompt", "x", "--quantize", "int3"))


def _images(folder):
    return {f.name: pixels(f).astype(int) for f in sorted(folder.glob("*.png"))}


def test_batches_and_seeds_per_image(tmp_path):
    """--batch-size batches prompts into one call; each image keeps its own seed (--seed + k), so
    an image equals the one-prompt call's up to the text padding a batch adds (measured ≤ 6/255 on
    these random tiny models; a wrong seed is a different image, ~100/255), and image k equals
    load_pipeline's with generator seed --seed + k."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red fox jumping over\nbird\n")
    runs = {}
    for bs in (1, 3):
        out = tmp_path / f"b{bs}"
        assert main(argv("sd3", out, "--prompts-file", str(prompts), "--num-images", "2", "--steps", "2",
                         "--seed", "5", "--batch-size", str(bs), "--quiet")) == 0
        runs[bs] = _images(out)
    assert sorted(runs[1]) == sorted(runs[3]) and len(runs[1]) == 6
    for name in runs[1]:
        assert np.abs(runs[1][name] - runs[3][name]).max() <= 8, name
    rec = json.loads((tmp_path / "b3" / "002-01.json").read_text())
    assert rec["batch"] == [0, 1, 2] and rec["image_seed"] == 6 and rec["batch_size"] == 3
    pipe = twinflow.load_pipeline(tiny_pipelines.saved_pipeline("sd3", "aux"), "sd3")
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt="bird", height=SIZE, width=SIZE, num_inference_steps=2, output_type="pil",
                generator=torch.Generator().manual_seed(6), guidance_scale=1.0).images[0]
    assert np.array_equal(runs[1]["002-01.png"], np.asarray(want).astype(int))


def test_torchrun_two_processes_give_the_one_process_images(tmp_path):
    """torchrun --nproc_per_node=2 (gloo on the CPU) shards the prompts (prompt p on rank p mod 2);
    every image is the same as with one process."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red fox\nbird\n")
    common = ["--prompts-file", str(prompts), "--num-images", "2", "--steps", "2", "--quiet"]
    assert main(argv("z-image", tmp_path / "one", *common)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "twinflow"]
    r = subprocess.run([*torchrun, *argv("z-image", tmp_path / "two", *common)], capture_output=True, text=True,
                       env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote 6 images") == 1  # rank 0 reports every process's images
    one, two = _images(tmp_path / "one"), _images(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 6
    for name in one:
        assert np.array_equal(one[name], two[name]), name
    ranks = {json.loads((tmp_path / "two" / f"{p:03d}-00.json").read_text())["rank"] for p in range(3)}
    assert ranks == {0, 1}


def test_image_to_image(tmp_path, capsys):
    """--image FILE --strength s: the family's Img2Img pipeline, the input image matters, and the
    settings JSON records both."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    for i in range(2):
        PILImage.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"in{i}.png")
    outs = {}
    for i in range(2):
        out = tmp_path / f"o{i}"
        assert main(argv("flux", out, "--prompt", "a cat", "--steps", "2", "--image", str(tmp_path / f"in{i}.png"),
                         "--strength", "0.5", "--quiet")) == 0
        outs[i] = pixels(out / "000-00.png").astype(int)
        rec = json.loads((out / "000-00.json").read_text())
        assert rec["strength"] == 0.5 and rec["input_image"].endswith(f"in{i}.png")
    assert np.abs(outs[0] - outs[1]).max() > 0
    for extra, needle in ((["--strength", "0.5"], "give --image"),
                          (["--image", str(tmp_path / "none.png")], "--image"),
                          (["--image", str(tmp_path / "in0.png"), "--strength", "1.5"], "(0, 1]")):
        capsys.readouterr()
        assert main(argv("sd3", tmp_path / "e", "--prompt", "x", *extra)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err and needle in err[-1], err
