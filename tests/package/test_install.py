"""The README's install commands, run as written, each block in a fresh virtual environment.

README.md marks its install blocks with ``<!-- install: wheel ... -->`` and
``<!-- install: source ... -->``; this test runs every line of each block with bash in the
repository root, in a new venv, then imports the installed package from outside the
repository and uses it: ``twinflow`` and ``twinflow.diffusers_patch`` come from the venv, the
deprecated ``import diffusers_patch`` is the same package (with a DeprecationWarning), the
packaged configs are there, ``twinflow --help`` runs and a sampling gives this session's
numbers.

Nothing is downloaded: ``PIP_NO_INDEX=1``, and the venv sees this environment's packages
(torch, diffusers, maturin, ...) through a ``.pth`` file naming a folder of links to them,
twinflow left out, so twinflow can only come from what the block installs. The build runs
``maturin`` and cargo from this environment (in CI the target folder is warm from
``.ci/install``, which builds the same wheel). Without cargo or maturin the test is skipped,
unless ``TWINFLOW_REQUIRE_INSTALL_TEST=1`` (``.ci/run`` sets it).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("TWINFLOW_REQUIRE_INSTALL_TEST") == "1"
_TOOLS = shutil.which("cargo") and shutil.which("maturin", path=os.path.dirname(sys.executable) + os.pathsep
                                                 + os.environ.get("PATH", ""))
if not _TOOLS and not REQUIRED:
    pytest.skip("no Rust toolchain (cargo) or maturin here; CI runs this test", allow_module_level=True)

# Runs in the fresh venv, from a folder outside the repository.
CHECK = r"""
import json, pathlib, subprocess, sys, warnings
import torch
import twinflow
from twinflow import diffusers_patch
from twinflow.training.config import packaged_configs

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import diffusers_patch as old
s = twinflow.UnifiedSampler.preset("2-nfe")
x = s.sample(lambda x, t, tt: 0.5 * x + tt.view(-1, 1), torch.linspace(-1, 1, 6).view(2, 3),
             generator=torch.Generator().manual_seed(0))
help_text = subprocess.run([pathlib.Path(sys.executable).parent / "twinflow", "--help"], capture_output=True,
                           text=True, check=True).stdout
print(json.dumps({
    "twinflow": twinflow.__file__, "patch": diffusers_patch.__file__,
    "old_is_new": old is diffusers_patch and old.sd3 is diffusers_patch.sd3,
    "deprecated": any(issubclass(w.category, DeprecationWarning) for w in caught),
    "configs": {name: str(path) for name, path in packaged_configs().items()},
    "sample": x.tolist(), "help": help_text,
}))
"""


def readme_block(name: str):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- install: {name}\b[^>]*-->\n```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no install block {name!r}"
    return [line for line in m.group(1).splitlines() if line.strip()]


def _dependencies_view(tmp: pathlib.Path) -> pathlib.Path:
    """A folder of links to this environment's installed packages, twinflow's own left out."""
    view = tmp / "deps"
    view.mkdir()
    site = pathlib.Path(sysconfig.get_path("purelib"))
    for entry in site.iterdir():
        if entry.name.split("-")[0].split(".")[0] in ("twinflow", "diffusers_patch") or entry.suffix == ".pth":
            continue
        (view / entry.name).symlink_to(entry)
    return view


def _fresh_venv(tmp: pathlib.Path, deps: pathlib.Path):
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # After the venv's own site-packages: what the block installs wins.
    (pathlib.Path(site) / "zz_dependencies.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(venv), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=os.pathsep.join([str(venv / "bin"), os.path.dirname(sys.executable), env.get("PATH", "")]))
    return venv, pathlib.Path(site), env


def _check(block: str, venv: pathlib.Path, site: pathlib.Path, env, cwd: pathlib.Path) -> None:
    out = subprocess.run([venv / "bin" / "python", "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{block}: {out.stderr[-3000:]}"
    got = json.loads(out.stdout.splitlines()[-1])
    # twinflow and its patches come from the venv, not from the repository or this environment
    assert pathlib.Path(got["twinflow"]).parent == site / "twinflow", (block, got["twinflow"])
    assert pathlib.Path(got["patch"]).parent == site / "twinflow" / "diffusers_patch", (block, got["patch"])
    assert got["old_is_new"] and got["deprecated"], block
    # every config of configs/ ships, as a file inside the package
    assert sorted(got["configs"]) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml")), block
    for path in got["configs"].values():
        assert pathlib.Path(path).parent == site / "twinflow" / "configs", (block, path)
    assert "train" in got["help"] and "generate" in got["help"], block

    import twinflow

    s = twinflow.UnifiedSampler.preset("2-nfe")
    expect = s.sample(lambda x, t, tt: 0.5 * x + tt.view(-1, 1), torch.linspace(-1, 1, 6).view(2, 3),
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.tensor(got["sample"], dtype=expect.dtype), expect), block


@pytest.mark.slow
def test_readme_install_blocks_in_a_fresh_venv(tmp_path):
    deps = _dependencies_view(tmp_path)
    # One venv path for both blocks: the second build then finds cargo's output up to date
    # (a new interpreter path rebuilds the PyO3 crates, ~25 s here).
    for block in ("source", "wheel"):
        lines = readme_block(block)
        assert any("torch==2.13.0" in line for line in lines)
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)
        venv, site, env = _fresh_venv(tmp_path, deps)
        run = subprocess.run(["bash", "-ec", "\n".join(lines)], cwd=REPO, env=env, capture_output=True, text=True)
        assert run.returncode == 0, f"README {block} block failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        _check(block, venv, site, env, tmp_path)
