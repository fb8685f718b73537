"""The datasets beyond MNIST, read back from small files written here in each one's exact on-disk
format (no network): CIFAR-10's binary records inside a tar.gz, Fashion-MNIST's IDX files at
their real sizes, Omniglot's chardata.mat (MATLAB v5, via scipy.io), a user's .npz. The files'
checksums differ from the real ones, so each test points the dataset's checksum at its file.
Corrupt or truncated files must be one-line errors naming the file; a missing file without a
network names the file and the folder. `--set data.name=NAME` alone switches datasets."""

from __future__ import annotations

import gzip
import io
import json
import math
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from test_mnist import closed_port_url, no_proxy, serve  # noqa: F401  (no_proxy: a fixture)
from test_mnist import one_line_error as one_line

from flowvae.data import DATASETS, ImageData, cifar10, fashion_mnist, npz, omniglot
from flowvae.data.download import file_digest
from flowvae.errors import DataError
from flowvae.experiments import ReportOptions
from flowvae.experiments.vae import VAEExperiment
from flowvae.likelihoods import LIKELIHOODS

EPS = 1e-3


def levels(x: torch.Tensor) -> torch.Tensor:
    """Continuous pixels back to the dequantised 8-bit value v = k + u ∈ [0, 256)."""
    return (x.double() - EPS) / (1 - 2 * EPS) * 256


# --------------------------------------------------------------------------- CIFAR-10


def cifar_images(ids: range) -> np.ndarray:
    """(n, 3, 32, 32) uint8 images whose bytes say where they come from: red = 8·id, green =
    8·row, blue = 8·column (multiples of 8, so dequantised values round back unambiguously)."""
    n = len(ids)
    images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = (8 * np.array(ids, dtype=np.uint8))[:, None, None]
    images[:, 1] = 8 * np.arange(32, dtype=np.uint8)[:, None]
    images[:, 2] = 8 * np.arange(32, dtype=np.uint8)[None, :]
    return images


def cifar_records(ids: range, labels: np.ndarray | None = None) -> bytes:
    """The binary release's records: one label byte, then 1024 R, 1024 G, 1024 B bytes."""
    labels = np.array(ids, dtype=np.uint8) % 10 if labels is None else labels
    rows = np.concatenate([labels[:, None], cifar_images(ids).reshape(len(ids), -1)], axis=1)
    return rows.astype(np.uint8).tobytes()


#: 5 training batches of 4 images (ids 0..19) and a test batch of 6 (ids 20..25)
TRAIN_IDS, TEST_IDS = range(20), range(20, 26)


def write_cifar(path: Path, members: dict[str, bytes] | None = None, drop: str = "") -> Path:
    """A cifar-10-binary.tar.gz laid out as the real one (folder, batches, meta, readme)."""
    if members is None:
        members = {
            f"data_batch_{i}.bin": cifar_records(TRAIN_IDS[4 * i - 4 : 4 * i]) for i in range(1, 6)
        }
        members["test_batch.bin"] = cifar_records(TEST_IDS)
    members = {"batches.meta.txt": b"airplane\nautomobile\n", **members, "readme.html": b"<html/>"}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            if name == drop:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cifar"
    root.mkdir()
    archive = write_cifar(root / cifar10.ARCHIVE)
    monkeypatch.setattr(cifar10, "SHA256", file_digest(archive))
    return root


def decode_patches(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, tops, lefts) of continuous 3×8×8 patch rows, checking every pixel on the way."""
    v = levels(x).view(-1, 3, 8, 8).numpy()
    q = np.round((v - 0.5) / 8).astype(int)  # the stored byte / 8
    assert np.all(np.abs(v - 8 * q - 0.5) <= 0.5 + 1e-3)  # each value inside its own 8-bit bin
    ids, tops, lefts = q[:, 0, 0, 0], q[:, 1, 0, 0], q[:, 2, 0, 0]
    assert np.all(q[:, 0] == ids[:, None, None])  # one image per patch
    assert np.all(q[:, 1] == tops[:, None, None] + np.arange(8)[None, :, None])  # 8 rows down
    assert np.all(q[:, 2] == lefts[:, None, None] + np.arange(8)[None, None, :])  # 8 columns
    assert tops.min() >= 0 and tops.max() <= 24 and lefts.min() >= 0 and lefts.max() <= 24
    return ids, tops, lefts


def test_cifar_archive_reads_back_byte_exact(tmp_path):
    archive = write_cifar(tmp_path / cifar10.ARCHIVE)
    train, labels, test, test_labels = cifar10.read_archive(archive)
    assert train.dtype == torch.uint8 and train.shape == (20, 3072)
    assert torch.equal(train, torch.from_numpy(cifar_images(TRAIN_IDS).reshape(20, -1)))
    assert torch.equal(test, torch.from_numpy(cifar_images(TEST_IDS).reshape(6, -1)))
    assert labels.tolist() == [i % 10 for i in TRAIN_IDS]
    assert test_labels.tolist() == [i % 10 for i in TEST_IDS]


def test_cifar_patches_are_split_by_image_and_reproducible(cifar_root):
    data = cifar10.load_cifar10_patches(cifar_root, valid_size=4, download=False, progress=False)
    assert isinstance(data, ImageData) and data.image_shape == (3, 8, 8) and data.dim == 192
    assert data.train.shape == (16, 3072) and data.train.dtype == torch.uint8  # whole images
    assert data.valid.shape == (4, 192) and data.test.shape == (6, 192)
    for split in (data.valid, data.test):
        assert split.dtype == torch.float32 and split.min() > EPS and split.max() < 1 - EPS
    valid_ids, _, _ = decode_patches(data.valid)
    test_ids, _, _ = decode_patches(data.test)
    assert sorted(valid_ids) == [16, 17, 18, 19]  # one patch per held-out image, in order
    assert sorted(test_ids) == list(TEST_IDS)
    again = cifar10.load_cifar10_patches(cifar_root, valid_size=4, seed=7, download=False)
    assert torch.equal(again.valid, data.valid) and torch.equal(again.test, data.test)

    torch.manual_seed(0)
    state = torch.get_rng_state()
    batch = data.train_batch(400)
    ids, tops, lefts = decode_patches(batch)
    assert set(ids) <= set(range(16))  # training patches never come from held-out images
    assert len(set(tops)) > 10 and len(set(lefts)) > 10  # fresh positions
    torch.set_rng_state(state)
    assert torch.equal(data.train_batch(400), batch)  # the RNG state alone fixes a batch

    static = cifar10.load_cifar10_patches(cifar_root, valid_size=4, binarize="static", seed=0)
    assert static.train.shape == (16, 192) and static.train.dtype == torch.float32
    assert sorted(decode_patches(static.train)[0]) == list(range(16))
    same = cifar10.load_cifar10_patches(cifar_root, valid_size=4, binarize="static", seed=0)
    other = cifar10.load_cifar10_patches(cifar_root, valid_size=4, binarize="static", seed=1)
    assert torch.equal(same.train, static.train) and not torch.equal(other.train, static.train)
    default = cifar10.load_cifar10_patches(cifar_root, download=False)
    assert default.valid.shape == (2, 192)  # a tenth of the training images

    binary = cifar10.load_cifar10_patches(cifar_root, valid_size=4, pixels="binary")
    assert set(binary.test.unique().tolist()) <= {0.0, 1.0} and binary.dim == 192


def test_cifar_bad_archives_are_one_line_errors(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    folder.mkdir()
    archive = folder / cifar10.ARCHIVE

    def load():
        return cifar10.load_cifar10_patches(folder, valid_size=1, download=False)

    good = write_cifar(tmp_path / "good.tar.gz").read_bytes()
    archive.write_bytes(good[: len(good) // 2])  # truncated: the real checksum refuses it
    with pytest.raises(DataError) as e:
        load()
    one_line(e, str(archive), "checksum mismatch", cifar10.SHA256, "delete it")
    monkeypatch.setattr(cifar10, "SHA256", file_digest(archive))  # ... and the reader too
    with pytest.raises(DataError) as e:
        load()
    one_line(e, str(archive), "corrupted or truncated")

    archive.write_bytes(b"\x1f\x8b" + b"garbage" * 50)
    monkeypatch.setattr(cifar10, "SHA256", file_digest(archive))
    with pytest.raises(DataError) as e:
        load()
    one_line(e, str(archive), "not a readable tar.gz")

    cases = {
        "member missing": ({}, "test_batch.bin", ["lacks", "test_batch.bin"]),
        "record cut": (
            {"data_batch_3.bin": cifar_records(range(4))[:-5]},
            "",
            ["data_batch_3.bin", "12287 bytes", "3073-byte records"],
        ),
        "label out of range": (
            {"test_batch.bin": cifar_records(TEST_IDS, np.full(6, 12, dtype=np.uint8))},
            "",
            ["test_batch.bin", "labels up to 12"],
        ),
    }
    for replace, drop, needles in cases.values():
        members = {f"data_batch_{i}.bin": cifar_records(range(4)) for i in range(1, 6)}
        members["test_batch.bin"] = cifar_records(TEST_IDS)
        write_cifar(archive, {**members, **replace}, drop=drop)
        monkeypatch.setattr(cifar10, "SHA256", file_digest(archive))
        with pytest.raises(DataError) as e:
            load()
        one_line(e, str(archive), *needles)


@pytest.mark.usefixtures("no_proxy")
def test_cifar_download_offline_and_from_a_mirror(tmp_path, monkeypatch):
    dest = tmp_path / "cache" / "cifar10_patches"
    with pytest.raises(DataError) as e:
        cifar10.load_cifar10_patches(dest, download=False)
    one_line(e, cifar10.ARCHIVE, str(dest), "downloading is off")
    with pytest.raises(DataError) as e:
        cifar10.load_cifar10_patches(dest, mirrors=[closed_port_url()], progress=False)
    one_line(e, cifar10.ARCHIVE, str(dest), "could not be downloaded", "FLOWVAE_DATA")

    served = tmp_path / "served"
    served.mkdir()
    write_cifar(served / cifar10.ARCHIVE)
    with serve(served) as url:
        with pytest.raises(DataError) as e:  # the real checksum: the served copy is refused
            cifar10.load_cifar10_patches(dest, valid_size=2, mirrors=[url], progress=False)
        one_line(e, cifar10.ARCHIVE, "SHA256 mismatch")
        assert not dest.exists()  # nothing unverified left behind, not even the folder
        monkeypatch.setattr(cifar10, "SHA256", file_digest(served / cifar10.ARCHIVE))
        data = cifar10.load_cifar10_patches(dest, valid_size=2, mirrors=[url], progress=True)
    assert [p.name for p in dest.iterdir()] == [cifar10.ARCHIVE]
    assert data.test.shape == (6, 192)


# --------------------------------------------------------------------------- Fashion-MNIST


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x00000800 | array.ndim  # unsigned bytes, ndim dimensions
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def idx_images(n: int, offset: int) -> np.ndarray:
    i = np.arange(offset, offset + n)[:, None, None]
    r, c = np.arange(28)[None, :, None], np.arange(28)[None, None, :]
    return ((i + 2 * r + 5 * c) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def fashion_files(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """The four gzipped IDX files at Fashion-MNIST's real sizes (60,000 and 10,000)."""
    folder = tmp_path_factory.mktemp("fashion")
    arrays = {
        fashion_mnist.TRAIN_IMAGES: idx_images(60000, 0),
        fashion_mnist.TRAIN_LABELS: (np.arange(60000) % 10).astype(np.uint8),
        fashion_mnist.TEST_IMAGES: idx_images(10000, 7),
        fashion_mnist.TEST_LABELS: (np.arange(10000) % 7).astype(np.uint8),
    }
    for name, array in arrays.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(array), compresslevel=1))
    return folder, arrays


@pytest.fixture
def fashion_root(fashion_files, monkeypatch) -> Path:
    folder, _ = fashion_files
    for name in fashion_mnist.FILES:
        monkeypatch.setitem(fashion_mnist.SHA256, name, file_digest(folder / name))
    return folder


def test_fashion_mnist_reads_its_idx_files(fashion_root, fashion_files):
    _, arrays = fashion_files
    data = fashion_mnist.load_fashion_mnist(fashion_root, download=False, progress=False)
    train = torch.from_numpy(arrays[fashion_mnist.TRAIN_IMAGES].reshape(60000, 784))
    assert data.image_shape == (28, 28) and data.train.shape == (50000, 784)
    assert torch.equal(data.train, train[:50000])  # intensities, row-major, as in the file
    assert data.valid.shape == (10000, 784) and data.test.shape == (10000, 784)
    assert torch.equal(data.valid_labels, torch.arange(50000, 60000) % 10)
    assert torch.equal(data.test_labels, torch.arange(10000) % 7)
    assert set(data.test.unique().tolist()) == {0.0, 1.0}
    # the test pixels are Bernoulli(k / 255) of the test file's images
    test = torch.from_numpy(arrays[fashion_mnist.TEST_IMAGES].reshape(10000, 784)).double()
    assert abs(float(data.test.double().mean() - test.mean() / 255)) < 0.005
    assert data.train_batch(64).shape == (64, 784)


def test_fashion_mnist_bad_files_are_one_line_errors(fashion_files, tmp_path, monkeypatch):
    folder, _ = fashion_files
    for name in fashion_mnist.FILES:
        shutil.copy(folder / name, tmp_path / name)
        monkeypatch.setitem(fashion_mnist.SHA256, name, file_digest(folder / name))
    monkeypatch.setitem(fashion_mnist.SHA256, fashion_mnist.TEST_LABELS, "0" * 64)
    with pytest.raises(DataError) as e:  # a file whose SHA256 is not the expected one
        fashion_mnist.load_fashion_mnist(tmp_path, download=False)
    one_line(e, fashion_mnist.TEST_LABELS, "checksum mismatch", "Fashion")
    labels = tmp_path / fashion_mnist.TEST_LABELS
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(10000, np.uint8))[:-100]))
    monkeypatch.setitem(fashion_mnist.SHA256, fashion_mnist.TEST_LABELS, file_digest(labels))
    with pytest.raises(DataError) as e:
        fashion_mnist.load_fashion_mnist(tmp_path, download=False)
    one_line(e, str(labels), "truncated", "Fashion-MNIST file")
    labels.unlink()
    with pytest.raises(DataError) as e:
        fashion_mnist.load_fashion_mnist(tmp_path, download=False)
    one_line(e, "Fashion-MNIST is not in", str(tmp_path), fashion_mnist.TEST_LABELS)


# --------------------------------------------------------------------------- Omniglot


def omniglot_images(n: int, offset: int) -> np.ndarray:
    """(n, 28, 28) grey images: a bar on row (id mod 28) at 0.5, and pixel (0, 27) at 1."""
    images = np.zeros((n, 28, 28))
    for j, i in enumerate(range(offset, offset + n)):
        images[j, i % 28, :] = 0.5
        images[j, 0, 27] = 1.0
    return images


def write_chardata(path: Path, train: np.ndarray, test: np.ndarray, **extra) -> Path:
    """chardata.mat as the IWAE repository has it: one image per column, MATLAB column-major."""

    def columns(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1, order="F").T  # column j = image j flattened (:)

    arrays = {
        "data": columns(train),
        "testdata": columns(test),
        "target": np.eye(50)[:, np.arange(len(train)) % 50],
        "testtarget": np.eye(50)[:, np.arange(len(test)) % 50],
        **extra,
    }
    scipy.io.savemat(path, arrays)
    return path


@pytest.fixture
def omniglot_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "omniglot"
    root.mkdir()
    path = write_chardata(root / omniglot.FILE, omniglot_images(60, 0), omniglot_images(10, 100))
    monkeypatch.setattr(omniglot, "MD5", file_digest(path, "md5"))
    return root


def test_omniglot_reads_chardata_in_the_iwae_split(omniglot_root):
    train, test = omniglot.read_chardata(omniglot_root / omniglot.FILE)
    assert train.shape == (60, 784) and test.shape == (10, 784) and train.dtype == torch.float32
    assert torch.equal(train, torch.from_numpy(omniglot_images(60, 0)).float().view(60, 784))
    data = omniglot.load_omniglot(omniglot_root, valid_size=6, download=False, progress=False)
    order = np.random.RandomState(123).permutation(60)  # IWAE's shuffle
    expected = torch.from_numpy(omniglot_images(60, 0)[order]).float().view(60, 784)
    assert torch.equal(data.train, expected[:54])  # grey levels kept for dynamic binarisation
    assert data.valid.shape == (6, 784) and data.test.shape == (10, 784)
    assert set(data.valid.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(data.test.view(10, 28, 28)[:, 0, 27] == 1)  # probability 1 stays 1
    batch = data.train_batch(500)
    assert set(batch.unique().tolist()) == {0.0, 1.0}
    assert float(batch.mean()) == pytest.approx(float(expected[:54].mean()), abs=0.01)
    with pytest.raises(DataError) as e:  # the default validation size needs the real file
        omniglot.load_omniglot(omniglot_root, valid_size=None, download=False)
    one_line(e, "valid_size", "1345")


def test_omniglot_bad_files_are_one_line_errors(tmp_path, monkeypatch):
    path = tmp_path / omniglot.FILE

    def load_after(write) -> pytest.ExceptionInfo:
        write()
        monkeypatch.setattr(omniglot, "MD5", file_digest(path, "md5"))
        with pytest.raises(DataError) as e:
            omniglot.load_omniglot(tmp_path, valid_size=1, download=False)
        return e

    images = omniglot_images(8, 0)
    whole = write_chardata(path, images, images).read_bytes()
    e = load_after(lambda: path.write_bytes(whole[: len(whole) // 2]))
    one_line(e, str(path), "not a readable MATLAB file")
    e = load_after(lambda: scipy.io.savemat(path, {"data": np.zeros((784, 3))}))
    one_line(e, str(path), "no 'testdata' array", "data")
    e = load_after(lambda: write_chardata(path, images, 2 * images))
    one_line(e, str(path), "'testdata'", "outside [0, 1]")
    e = load_after(lambda: scipy.io.savemat(path, {"data": np.zeros((783, 3)), "testdata": 0}))
    one_line(e, str(path), "(783, 3)", "(784, N)")
    write_chardata(path, images, images)
    monkeypatch.setattr(omniglot, "MD5", "0" * 32)
    with pytest.raises(DataError) as e:
        omniglot.load_omniglot(tmp_path, valid_size=1, download=False)
    one_line(e, str(path), "checksum mismatch", "MD5")
    path.unlink()
    with pytest.raises(DataError) as e:
        omniglot.load_omniglot(tmp_path, mirrors=[closed_port_url()], progress=False)
    one_line(e, "Omniglot", omniglot.FILE, str(tmp_path), "could not be downloaded")


# --------------------------------------------------------------------------- npz


def test_npz_layouts(tmp_path):
    gen = np.random.default_rng(0)
    grey = gen.integers(0, 256, size=(30, 5, 6), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", train=grey[:20], test=grey[20:], labels=np.arange(30))
    data = npz.load_npz(tmp_path / "grey.npz", valid_size=4)
    assert data.image_shape == (5, 6) and data.train.dtype == torch.uint8
    assert torch.equal(data.train, torch.from_numpy(grey[:16].reshape(16, 30)))
    assert data.valid.shape == (4, 30) and data.test.shape == (10, 30)
    assert npz.load_npz(tmp_path / "grey.npz").valid.shape == (2, 30)  # a tenth by default

    colour = gen.random((12, 4, 4, 3)).astype(np.float32)  # channels-last floats in [0, 1]
    np.savez(tmp_path / "data.npz", train=colour[:8], valid=colour[8:10], test=colour[10:])
    data = npz.load_npz(tmp_path, pixels="continuous", eps=0.01)  # a folder holding data.npz
    assert data.image_shape == (3, 4, 4) and data.dim == 48
    expected = torch.from_numpy(colour[10:].transpose(0, 3, 1, 2).reshape(2, 48))
    assert torch.allclose(data.test, 0.01 + 0.98 * expected)  # squeezed, not dequantised
    assert data.pixels.levels is None and data.valid.shape == (2, 48)
    binary = npz.load_npz(tmp_path / "data.npz")
    assert set(binary.test.unique().tolist()) <= {0.0, 1.0}


def test_npz_bad_files_are_one_line_errors(tmp_path):
    path = tmp_path / "x.npz"
    good = np.zeros((4, 3, 3), dtype=np.uint8)
    bad_files = {
        "no test": (dict(train=good), ["no test array", "it holds train", "(N, H, W)"]),
        "2-D": (dict(train=np.zeros((4, 9)), test=good), ["'train'", "(4, 9)", "(N, H, W)"]),
        "int64": (dict(train=good.astype(np.int64), test=good), ["'train'", "int64", "uint8"]),
        "range": (dict(train=good + 2.0, test=good), ["'train'", "outside [0, 1]"]),
        "shapes": (dict(train=good, test=np.zeros((4, 3, 4), np.uint8)), ["differ", "(1, 3, 4)"]),
        "objects": (dict(train=np.array([None] * 4), test=good), ["pickled objects"]),
    }
    for arrays, needles in bad_files.values():
        np.savez(path, **arrays)
        with pytest.raises(DataError) as e:
            npz.load_npz(path)
        one_line(e, str(path), *needles)
    np.savez(path, train=good, test=good)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 40])
    with pytest.raises(DataError) as e:
        npz.load_npz(path)
    one_line(e, str(path), "corrupted or truncated")
    np.savez(path, train=good, valid=good, test=good)
    with pytest.raises(DataError) as e:
        npz.load_npz(path, valid_size=2)
    one_line(e, "valid array", "data.valid_size must be null")
    with pytest.raises(DataError) as e:
        npz.load_npz(tmp_path / "nope.npz")
    one_line(e, "nope.npz", "data.root", "train and test")


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def dataset_roots(tmp_path, monkeypatch, fashion_root, mnist_dir) -> dict[str, Path]:
    """A folder (or file) per registered dataset, in its format, its checksum pointed at it."""
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    monkeypatch.setattr(cifar10, "SHA256", file_digest(write_cifar(cifar / cifar10.ARCHIVE)))
    omni = tmp_path / "omni"
    omni.mkdir()
    chardata = write_chardata(
        omni / omniglot.FILE, omniglot_images(1400, 0), omniglot_images(20, 0)
    )
    monkeypatch.setattr(omniglot, "MD5", file_digest(chardata, "md5"))
    images = np.random.default_rng(1).integers(0, 256, size=(50, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", train=images[:40], test=images[40:])
    return {
        "mnist": mnist_dir,
        "fashion_mnist": fashion_root,
        "omniglot": omni,
        "cifar10_patches": cifar,
        "npz": tmp_path / "mine.npz",
    }


def test_one_set_switches_the_dataset(dataset_roots, cli_in_process, tmp_path):
    """Every registered dataset trains and evaluates from configs/mnist_quick.yaml with only
    data.name (and data.root, where the test's files are) changed: its default likelihood,
    valid split and image shape come from the registry."""
    assert sorted(dataset_roots) == DATASETS.names()
    small = ["model.hidden=[16]", "model.latent_dim=4", "flow.k=1", "train.steps=2"]
    small += ["train.batch_size=8", "train.eval_every=2", "eval.batch_size=500", "device=cpu"]
    for name, root in dataset_roots.items():
        run = tmp_path / f"run-{name}"
        sets = [f"data.name={name}", f"data.root={root}", *small]
        args = [a for s in sets for a in ("--set", s)]
        proc = cli_in_process(
            "train", "--config", "mnist_quick", *args, "--no-progress", "--out", run
        )
        assert proc.returncode == 0, (name, proc.stderr)
        best = run / "checkpoints" / "best.pt"
        proc = cli_in_process("eval", best, "--json", "--iw-samples", "4", "--limit", "6")
        assert proc.returncode == 0, (name, proc.stderr)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        likelihood = DATASETS.get(name).likelihood
        assert (r["dataset"], r["likelihood"], r["examples"]) == (name, likelihood, 6), name
        continuous = LIKELIHOODS.get(likelihood).pixels == "continuous"
        assert ("bits_per_dim_8bit" in r) == continuous and math.isfinite(r["nll"]), name
        proc = cli_in_process("sample", best, "--n", "4", "--out", run / "s.png")
        assert proc.returncode == 0, (name, proc.stderr)
    from PIL import Image

    with Image.open(tmp_path / "run-cifar10_patches" / "s.png") as picture:
        assert picture.size == (2 * 10 + 2, 2 * 10 + 2) and picture.mode == "RGB"  # 8-px tiles
    with Image.open(tmp_path / "run-npz" / "s.png") as picture:
        assert picture.size == (2 * 8 + 2, 2 * 8 + 2)  # 6×6 images


def test_list_shows_every_dataset_and_likelihood(cli_in_process, tmp_path):
    proc = cli_in_process("list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in DATASETS.names() + LIKELIHOODS.names():
        assert name in proc.stdout, name


def test_report_columns_know_continuous_from_binary(tmp_path):
    info = {"steps": 10, "train_seconds": 60.0, "hardware": "cpu"}
    base = {"kind": "vae", "split": "test", "iw_samples": 200, "examples": 10, "info": info}
    rows = [
        {**base, "dataset": "mnist", "flow": "planar", "k": 10, "neg_elbo": 90.0, "nll": 88.0,
         "nll_stderr": 0.2},
        {**base, "dataset": "cifar10_patches", "likelihood": "logit_normal", "flow": "planar",
         "k": 10, "neg_elbo": -300.0, "nll": -310.0, "nll_stderr": 1.0, "bits_per_dim": -2.33,
         "bits_per_dim_stderr": 0.01, "bits_per_dim_8bit": 5.67},
    ]  # fmt: skip
    lines = VAEExperiment.report(rows, ReportOptions(load=None, plot=tmp_path / "k.png"))
    text = "\n".join(lines)
    assert text.startswith("## Flow VAE on CIFAR-10 3×8×8 patches")  # datasets by name
    cifar, mnist = text.split("## Flow VAE on binarised MNIST")
    assert "bits/dim" not in mnist
    assert "≤ 87.5" in mnist  # Table 2
    assert "| bits/dim | bits/dim (8-bit) |" in cifar
    assert "| -2.330 | 5.670 |" in cifar and "| -320.7 |" in cifar  # Table 3, K = 10
    for suffix in ("mnist-bernoulli", "cifar10_patches-logit_normal"):
        assert (tmp_path / f"k-{suffix}.png").read_bytes()[:4] == b"\x89PNG"
