"""The package's names: ``twinflow.diffusers_patch`` (and the deprecated top-level
``diffusers_patch``), the configs shipped inside the package, ``dir(twinflow)``.

The installed wheel is checked the same way by ``test_install.py``; here the package is the
one under test (a source checkout on PYTHONPATH, or the installed wheel in CI).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest


import twinflow  # noqa: E402
from twinflow import diffusers_patch  # noqa: E402
from twinflow.cli import main  # noqa: E402
from twinflow.training.config import load_config, packaged_configs  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_old_top_level_name_is_the_same_package_with_a_deprecation_warning(monkeypatch):
    for name in [n for n in sys.modules if n == "diffusers_patch" or n.startswith("diffusers_patch.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.warns(DeprecationWarning, match="from twinflow import diffusers_patch"):
        import diffusers_patch as old
    from diffusers_patch.sd3 import SD3  # noqa: E402  (a submodule by its old name)

    assert old is diffusers_patch
    assert SD3 is diffusers_patch.sd3.SD3 and type(old.backbone("sd3")) is SD3
    assert sys.modules["diffusers_patch._common"] is sys.modules["twinflow.diffusers_patch._common"]


def test_a_users_diffusers_patch_file_does_not_break_load_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import tiny_pipelines

    folder = tiny_pipelines.saved_pipeline("sd3")
    # A script of the user's own, named like our old top-level package, in the working directory.
    (tmp_path / "diffusers_patch.py").write_text("print('my own diffusers_patch')\n")
    code = textwrap.dedent(f"""
        import torch, twinflow
        pipe = twinflow.load_pipeline({str(folder)!r}, "sd3")
        from twinflow import diffusers_patch
        assert diffusers_patch.is_patched(pipe.transformer)
        import diffusers_patch as mine
        assert mine.__file__ == {str(tmp_path / "diffusers_patch.py")!r}
        print("loaded")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["my own diffusers_patch", "loaded"]


def test_dir_lists_the_lazily_imported_names():
    names = dir(twinflow)
    for name in twinflow.__all__:
        assert name in names, name
    assert {"load_pipeline", "TwinFlowScheduler", "TwinFlowPresetScheduler", "scheduler_for_steps",
            "preset_for_steps"} <= set(names)
    assert names == sorted(names)


def test_every_repository_config_ships_in_the_package():
    shipped = packaged_configs()
    assert sorted(shipped) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    for name, path in shipped.items():
        assert path.read_bytes() == (REPO / "configs" / f"{name}.yaml").read_bytes()


@pytest.mark.parametrize("given", ["sd35_lora_2order", "sd35_lora_2order.yaml"])
def test_config_by_name(given):
    cfg = load_config(given)
    assert cfg.model.name == "sd3" and cfg.lora.enabled and cfg.twinflow.estimate_order == 2
    assert cfg.to_dict() == load_config(REPO / "configs" / "sd35_lora_2order.yaml").to_dict()


def test_config_path_still_wins_over_a_name(tmp_path, monkeypatch):
    own = tmp_path / "sd35_lora_2order"  # a file of that name in the working directory
    own.write_text((REPO / "configs" / "sd35_lora_2order.yaml").read_text().replace("rank: 64", "rank: 8"))
    monkeypatch.chdir(tmp_path)
    assert load_config("sd35_lora_2order").lora.rank == 8


def test_unknown_config_name_is_one_line_listing_the_names(tmp_path, capsys):
    rc = main(["train", "--config", "sd35_lora_3order", "--dataset-path", str(tmp_path), "--output-dir",
               str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "'sd35_lora_3order' is neither a file nor a packaged config" in err[0]
    assert "sd35_lora_2order" in err[0] and "qwen_image_full_1order" in err[0]
    with pytest.raises(ValueError, match="no such file"):
        load_config(tmp_path / "none.yaml")


def test_the_old_lora_module_name_warns_and_works():
    import importlib
    import sys

    import pytest

    sys.modules.pop("twinflow.lora_export", None)
    with pytest.warns(DeprecationWarning, match="lora_files"):
        old = importlib.import_module("twinflow.lora_export")
    from twinflow import lora_files

    assert old.save is lora_files.save and old.load_into is lora_files.load_into
