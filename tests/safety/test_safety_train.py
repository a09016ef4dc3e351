"""``twinflow train`` output-folder faults (issue 14): one writer per folder, no fresh run over
an earlier run's checkpoints, a full disk leaves the previous checkpoint and no temp folder.

The CLI cases stop before any model or data is loaded (the folder is checked first), so the
config may point at a model folder that does not exist.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from twinflow._lock import LOCK_NAME, OutputDirLock, OutputDirLocked
from twinflow.cli import main
from twinflow.training import checkpoint as ckpt

_HOLD = """
import sys, time
from twinflow._lock import OutputDirLock
OutputDirLock(sys.argv[1]).acquire()
print("LOCKED", flush=True)
time.sleep(600)
"""


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "LOCKED"
    return proc


def test_second_writer_is_refused_and_a_dead_owner_frees_the_folder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(OutputDirLocked, match=f"PID {proc.pid}"):
            OutputDirLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays behind, the lock does not
    with OutputDirLock(tmp_path):
        with pytest.raises(OutputDirLocked):  # one writer per folder, in one process too
            OutputDirLock(tmp_path).acquire()
    OutputDirLock(tmp_path).acquire().release()


def _config(tmp_path):
    path = tmp_path / "cfg.yaml"
    (tmp_path / "empty-model").mkdir(exist_ok=True)  # a local folder: the output-dir checks come next
    path.write_text(f"""\
model: {{name: sd3, pretrained_model_name_or_path: {tmp_path / 'empty-model'}}}
training: {{batch_size: 4, max_steps: 3}}
""")
    return path


def _train(tmp_path, out, capsys, *extra):
    capsys.readouterr()
    rc = main(["train", "--config", str(_config(tmp_path)), "--dataset-path", str(tmp_path / "no-data.parquet"),
               "--output-dir", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, (err[-1] if err else "")


def test_train_refuses_a_folder_in_use(tmp_path, capsys):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        rc, err = _train(tmp_path, out, capsys)
    finally:
        proc.kill()
        proc.wait()
    assert rc == 1 and "in use by another twinflow run" in err and str(proc.pid) in err, err


def _old_checkpoint(root, step):
    return ckpt.write(root, step, lambda tmp: torch.save({"step": step}, tmp / "trainer_state.pt"))


def test_fresh_run_over_old_checkpoints_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _old_checkpoint(out / "checkpoints", 7)
    rc, err = _train(tmp_path, out, capsys)
    assert rc == 1 and "step-000007" in err and "--resume auto" in err and "--overwrite" in err, err
    assert (out / "checkpoints" / "step-000007").is_dir()
    rc, err = _train(tmp_path, out, capsys, "--overwrite", "--resume", "auto")
    assert rc == 1 and "cannot be combined" in err, err
    # --overwrite deletes them, then the run goes on (and fails later here: there is no model)
    rc, err = _train(tmp_path, out, capsys, "--overwrite")
    assert not (out / "checkpoints").exists()
    assert "already holds checkpoints" not in err
    # the failed run released the folder
    OutputDirLock(out).acquire().release()


def test_resolve_resume_without_checkpoints_starts_fresh(tmp_path):
    assert ckpt.resolve_resume(None, tmp_path / "checkpoints") is None
    assert ckpt.resolve_resume("auto", tmp_path / "checkpoints") is None


def test_disk_full_keeps_the_previous_checkpoint_and_no_temp_folder(tmp_path):
    root = tmp_path / "checkpoints"
    first = _old_checkpoint(root, 2)

    def full(tmp):
        (tmp / "trainer_state.pt").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(ValueError, match="cannot write checkpoint step-000004: No space left on device; "
                                         "the previous checkpoint .*step-000002 is kept"):
        ckpt.write(root, 4, full)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    assert ckpt.verify(first)["step"] == 2
    with pytest.raises(KeyboardInterrupt):  # any interruption cleans up too
        ckpt.write(root, 5, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
