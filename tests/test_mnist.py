"""MNIST loading: the real files, the IDX reader's errors, binarisation and the downloader."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import http.server
import os
import shutil
import socket
import struct
import threading
from pathlib import Path

import pytest
import torch

from flowvae.data import DATASETS, ImageData, default_root, ensure_files, load_mnist
from flowvae.data.download import fetch, sha256_of
from flowvae.data.idx import read_idx
from flowvae.data.mnist import (
    FILES,
    MNIST,
    SHA256,
    TEST_IMAGES,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    load_idx_dataset,
)
from flowvae.errors import DataError
from flowvae.registry import UnknownNameError

REAL_DIR = Path(
    os.environ.get("FLOWVAE_TEST_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
)
HAVE_REAL = all((REAL_DIR / name).is_file() for name in FILES)
needs_real = pytest.mark.skipif(not HAVE_REAL, reason=f"MNIST files not found in {REAL_DIR}")

PIXEL_MEAN = 0.1307  # mean intensity of the 60k MNIST training images, / 255


def one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def write_idx(path: Path, magic: int, dims: tuple[int, ...], n_data: int | None = None) -> None:
    """An IDX file with the given header and ``n_data`` bytes of data (default: as declared)."""
    n = n_data if n_data is not None else int(torch.tensor(dims).prod())
    header = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)
    path.write_bytes(header + bytes(range(256)) * (n // 256) + bytes(n % 256))


# --------------------------------------------------------------------------- fixtures


def _load(**kw) -> ImageData:
    return load_mnist(REAL_DIR, download=False, progress=False, **kw)


@pytest.fixture(scope="module")
def dynamic() -> ImageData:
    return _load()


@pytest.fixture(scope="module")
def static0() -> ImageData:
    return _load(binarize="static", seed=0)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    """The four files un-gzipped (names without .gz)."""
    folder = tmp_path_factory.mktemp("raw")
    for name in FILES:
        with gzip.open(REAL_DIR / name, "rb") as src, open(folder / name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return folder


@contextlib.contextmanager
def serve(folder: Path):
    """An HTTP server on 127.0.0.1 serving ``folder``; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def no_proxy(monkeypatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --------------------------------------------------------------------------- real files


@needs_real
def test_real_files_shapes_labels_and_pixel_mean():
    train = read_idx(REAL_DIR / TRAIN_IMAGES)
    labels = read_idx(REAL_DIR / TRAIN_LABELS)
    test = read_idx(REAL_DIR / TEST_IMAGES)
    test_labels = read_idx(REAL_DIR / "t10k-labels-idx1-ubyte.gz")
    assert train.dtype == torch.uint8 and train.shape == (60000, 28, 28)
    assert test.shape == (10000, 28, 28)
    assert labels.shape == (60000,) and test_labels.shape == (10000,)
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert int(test_labels.min()) == 0 and int(test_labels.max()) == 9
    assert torch.bincount(labels.long()).tolist()[1] == 6742  # the well-known count of ones
    mean = train.double().mean().item() / 255
    assert 0.12 < mean < 0.14 and abs(mean - PIXEL_MEAN) < 1e-3
    assert int(train.max()) == 255 and int(train.min()) == 0


@needs_real
def test_gzipped_and_raw_files_give_identical_tensors(raw_dir, dynamic):
    for name in FILES:
        assert torch.equal(read_idx(REAL_DIR / name), read_idx(raw_dir / name[:-3])), name
    paths = ensure_files(raw_dir, download=False)
    assert all(not p.name.endswith(".gz") for p in paths.values())
    from_raw = load_mnist(raw_dir, download=False)
    for split in ("train", "valid", "test", "train_labels", "test_labels"):
        assert torch.equal(getattr(from_raw, split), getattr(dynamic, split)), split


@needs_real
def test_split_sizes(dynamic):
    assert dynamic.binarize == "dynamic"
    assert dynamic.train.shape == (50000, 784) and dynamic.train.dtype == torch.uint8
    assert dynamic.valid.shape == (10000, 784) and dynamic.valid.dtype == torch.float32
    assert dynamic.test.shape == (10000, 784) and dynamic.test.dtype == torch.float32
    assert int(dynamic.train.max()) == 255  # intensities, not yet binarised
    # the validation set is the LAST valid_size images of the training file
    assert torch.equal(dynamic.valid_labels, read_idx(REAL_DIR / TRAIN_LABELS)[50000:].long())
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    no_valid = _load(valid_size=0)
    assert torch.equal(torch.get_rng_state(), rng)  # fixed-seed binarisation uses its own RNG
    assert no_valid.train.shape == (60000, 784)
    assert no_valid.valid.shape == (0, 784) and no_valid.valid.dtype == torch.float32
    assert torch.equal(no_valid.train[:50000], dynamic.train)
    assert torch.equal(no_valid.test, dynamic.test)


@needs_real
def test_static_binarisation_is_seeded_and_valid_test_do_not_depend_on_seed(static0, dynamic):
    assert static0.binarize == "static" and static0.train.dtype == torch.uint8
    assert set(static0.train.unique().tolist()) == {0, 1}
    again = _load(binarize="static", seed=0)
    assert torch.equal(again.train, static0.train)
    other = _load(binarize="static", seed=1)
    differ = (other.train != static0.train).float().mean().item()
    assert 0.01 < differ < 0.2  # only grey pixels can differ
    for split in ("valid", "test"):
        for data in (again, other, dynamic):
            assert torch.equal(getattr(data, split), getattr(static0, split)), split
        values = getattr(static0, split)
        assert set(values.unique().tolist()) == {0.0, 1.0}
    assert abs(static0.train.float().mean().item() - PIXEL_MEAN) < 0.005
    assert abs(static0.test.mean().item() - PIXEL_MEAN) < 0.01


@needs_real
def test_dynamic_batches(dynamic, static0):
    torch.manual_seed(0)
    a = dynamic.train_batch(4000)
    b = dynamic.train_batch(4000)
    assert a.shape == (4000, 784) and a.dtype == torch.float32
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert abs(a.mean().item() - PIXEL_MEAN) < 0.02
    assert abs(b.mean().item() - PIXEL_MEAN) < 0.02
    assert not torch.equal(a, b)
    # same global RNG state -> same batch (what makes resuming from a checkpoint exact)
    state = torch.get_rng_state()
    c = dynamic.train_batch(64)
    torch.set_rng_state(state)
    assert torch.equal(dynamic.train_batch(64), c)
    # the batch is Bernoulli(intensity / 255) of the drawn images: 1s only where there is ink
    torch.manual_seed(1)
    d = dynamic.train_batch(64)
    torch.manual_seed(1)
    idx = torch.randint(0, dynamic.train.shape[0], (64,))
    assert torch.equal((d > 0), (d > 0) & (dynamic.train[idx] > 0))  # 1s only where ink
    s = static0.train_batch(256)
    assert s.dtype == torch.float32 and set(s.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        dynamic.train_batch(0)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path, binarize="dynamc", download=False)
    one_line_error(e, "binarize", "dynamc")
    for bad in (60000, -1):
        with pytest.raises(DataError) as e:
            load_mnist(tmp_path, valid_size=bad, download=False)
        one_line_error(e, "valid_size", str(bad))


def test_registry_and_default_root(monkeypatch, tmp_path):
    entry = DATASETS.get("mnist")
    assert entry.load is load_mnist and entry.likelihood == "bernoulli"
    assert "mnist" in DATASETS
    with pytest.raises(UnknownNameError, match="did you mean 'mnist'"):
        DATASETS.get("mnsit")
    monkeypatch.setenv("FLOWVAE_DATA", str(tmp_path))
    assert default_root() == tmp_path / "mnist"  # one folder per dataset under FLOWVAE_DATA
    (tmp_path / TRAIN_LABELS).write_bytes(b"")
    assert default_root() == tmp_path  # ... unless the MNIST files sit in it (the old rule)
    monkeypatch.delenv("FLOWVAE_DATA")
    assert default_root() == Path.home() / ".cache" / "flowvae" / "mnist"


# --------------------------------------------------------------------------- bad files


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, 0x00000802, (2, 3))
    with pytest.raises(DataError) as e:
        read_idx(path)
    one_line_error(e, str(path), "magic number 0x00000802", "0x00000803")
    html = tmp_path / "t10k-labels-idx1-ubyte.gz"  # e.g. an HTML error page saved as .gz
    html.write_bytes(gzip.compress(b"<html>Not Found</html>"))
    with pytest.raises(DataError) as e:
        read_idx(html)
    one_line_error(e, str(html), "magic number")
    floats = tmp_path / "floats-idx1"
    write_idx(floats, 0x00000D01, (4,), n_data=16)  # float32 elements, not bytes
    with pytest.raises(DataError, match="magic number"):
        read_idx(floats)


def test_truncated_and_overlong_files(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, 0x00000803, (60000, 28, 28), n_data=1000)
    with pytest.raises(DataError) as e:
        read_idx(path)
    one_line_error(
        e,
        str(path),
        "truncated",
        "expected 47040000 bytes of data after the 16-byte header, found 1000",
    )
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(DataError) as e:
        read_idx(gz)
    one_line_error(e, "train-images-idx3-ubyte.gz is truncated", "re-download")
    short = tmp_path / "labels"
    short.write_bytes(b"\x00\x00\x08\x01\x00")  # header cut inside the dimensions
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)
    long = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(long, 0x00000801, (10,), n_data=12)
    with pytest.raises(DataError) as e:
        read_idx(long)
    one_line_error(e, str(long), "2 bytes more")
    ok = tmp_path / "ok-idx1"
    write_idx(ok, 0x00000801, (300,))
    assert read_idx(ok).tolist() == list(range(256)) + [0] * 44


def test_corrupted_gzip(tmp_path):
    garbage = tmp_path / "train-labels-idx1-ubyte.gz"
    garbage.write_bytes(b"this is not gzip data at all" * 10)
    with pytest.raises(DataError) as e:
        read_idx(garbage)
    one_line_error(e, str(garbage), "gzip")
    cut = tmp_path / "t10k-labels-idx1-ubyte.gz"
    cut.write_bytes(gzip.compress(bytes(10008))[:-30])  # stream ends early
    with pytest.raises(DataError) as e:
        read_idx(cut)
    one_line_error(e, str(cut), "gzip")
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "nope.gz")
    one_line_error(e, "nope.gz", "does not exist")


@needs_real
def test_checksum_mismatch_of_a_gz_file(tmp_path):
    for name in FILES:
        (tmp_path / name).symlink_to(REAL_DIR / name)
    (tmp_path / TRAIN_LABELS).unlink()
    (tmp_path / TRAIN_LABELS).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(4)))
    with pytest.raises(DataError) as e:
        ensure_files(tmp_path, download=False)
    one_line_error(e, str(tmp_path / TRAIN_LABELS), "checksum mismatch", "delete it")
    with pytest.raises(DataError, match="checksum mismatch"):
        load_mnist(tmp_path, download=True, mirrors=[])


@needs_real
def test_bad_ungzipped_file_is_caught_by_shape_or_size(tmp_path):
    # MNIST's un-gzipped files are checksummed (test_data_layouts.py); a source whose raw
    # checksums are unknown (Fashion-MNIST) relies on these checks
    unsummed = functools.partial(load_idx_dataset, dataclasses.replace(MNIST, raw_sha256=None))
    for name in FILES:
        (tmp_path / name).symlink_to(REAL_DIR / name)
    (tmp_path / TRAIN_LABELS).unlink()
    raw = tmp_path / TRAIN_LABELS[:-3]
    write_idx(raw, 0x00000801, (60000,), n_data=59000)
    with pytest.raises(DataError) as e:
        unsummed(tmp_path, download=False)
    one_line_error(
        e,
        str(raw),
        "truncated",
        "expected 60000 bytes of data after the 8-byte header, found 59000",
    )
    write_idx(raw, 0x00000801, (100,))
    with pytest.raises(DataError) as e:
        unsummed(tmp_path, download=False)
    one_line_error(e, str(raw), "shape (100,)", "(60000,)")


def test_missing_files_without_download(tmp_path):
    folder = tmp_path / "empty"
    with pytest.raises(DataError) as e:
        ensure_files(folder, download=False)
    one_line_error(e, str(folder), *FILES)
    assert not folder.exists()  # nothing created when not downloading


# --------------------------------------------------------------------------- download


@needs_real
@pytest.mark.usefixtures("no_proxy")
def test_download_from_a_local_mirror(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for name in FILES:
        shutil.copy(REAL_DIR / name, good / name)
    dest = tmp_path / "cache" / "mnist"  # does not exist yet
    with serve(good) as url:
        paths = ensure_files(dest, download=True, mirrors=[url], progress=True)
    assert sorted(os.listdir(dest)) == sorted(FILES)  # no temporary files left
    for name in FILES:
        assert paths[name] == dest / name
        assert sha256_of(dest / name) == SHA256[name]
    # everything is present now: no network needed
    assert ensure_files(dest, download=True, mirrors=[]) == paths


@needs_real
@pytest.mark.usefixtures("no_proxy")
def test_download_rejects_a_checksum_mismatch_and_falls_back(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    shutil.copy(REAL_DIR / TRAIN_LABELS, good / TRAIN_LABELS)
    data = bytearray((REAL_DIR / TRAIN_LABELS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / TRAIN_LABELS).write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with serve(bad) as bad_url, serve(good) as good_url:
        with pytest.raises(DataError) as e:
            fetch(TRAIN_LABELS, dest, SHA256[TRAIN_LABELS], mirrors=[bad_url], progress=False)
        one_line_error(e, TRAIN_LABELS, "SHA256 mismatch", str(dest))
        assert not dest.exists()  # no partial or unverified file behind, nor the folder
        with pytest.raises(DataError) as e:
            ensure_files(dest, download=True, mirrors=[bad_url], progress=False)
        one_line_error(e, TRAIN_IMAGES, "HTTP 404")
        assert not dest.exists()
        path = fetch(
            TRAIN_LABELS, dest, SHA256[TRAIN_LABELS], mirrors=[bad_url, good_url], progress=False
        )
    assert path == dest / TRAIN_LABELS and sha256_of(path) == SHA256[TRAIN_LABELS]
    assert os.listdir(dest) == [TRAIN_LABELS]


@pytest.mark.usefixtures("no_proxy")
def test_no_network_names_the_missing_files_and_folder(tmp_path):
    empty = tmp_path / "served"
    empty.mkdir()
    dest = tmp_path / "dest"
    with serve(empty) as url_404:
        with pytest.raises(DataError) as e:
            ensure_files(dest, download=True, mirrors=[closed_port_url(), url_404], progress=False)
    one_line_error(e, str(dest), "could not be downloaded", "FLOWVAE_DATA", *FILES)
    assert not dest.exists()  # a failed download leaves no folder behind
