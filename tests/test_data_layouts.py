"""Data in the layouts people keep it, and what a missing or foreign file does.

- CIFAR-10's extracted ``cifar-10-batches-bin/`` folder is read as it is (each batch's size and
  labels checked; one note says the content is not), giving the archive's exact tensors;
- un-gzipped IDX files are read as they are: MNIST's against the SHA256 of their content,
  Fashion-MNIST's by header and size, with one note saying so;
- a missing dataset leaves no folder behind (data.root, or ~/.cache/flowvae/<name>);
- a file given as .npz that is not one is a one-line error saying so.
Files are written here in each dataset's exact on-disk format (no network)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_datasets import cifar_records, one_line, write_cifar
from test_mnist import REAL_DIR, closed_port_url, needs_real, no_proxy  # noqa: F401  (fixture)

from flowvae.data import DATASETS, cifar10, fashion_mnist, mnist, npz
from flowvae.data.download import file_digest
from flowvae.errors import DataError

SPLITS = ("train", "valid", "test", "train_labels", "valid_labels", "test_labels")


def extract_cifar(archive: Path, into: Path) -> Path:
    shutil.unpack_archive(archive, into)
    return into / cifar10.FOLDER


def test_cifar_extracted_folder_reads_as_the_archive(tmp_path, monkeypatch, capfd):
    (tmp_path / "archive").mkdir()
    batches = {f"data_batch_{i}.bin": cifar_records(range(4 * i - 4, 4 * i)) for i in range(1, 6)}
    batches["test_batch.bin"] = cifar_records(range(20, 24))  # 4 records each, as 10,000 are
    archive = write_cifar(tmp_path / "archive" / cifar10.ARCHIVE, batches)
    monkeypatch.setattr(cifar10, "SHA256", file_digest(archive))
    monkeypatch.setattr(cifar10, "BATCH_RECORDS", 4)  # the test batches' size (real: 10,000)
    folder = extract_cifar(archive, tmp_path / "extracted")
    from_archive = cifar10.load_cifar10_patches(archive.parent, valid_size=3, download=False)
    assert "note:" not in capfd.readouterr().err  # the archive is checksummed: nothing to say
    for root in (folder.parent, folder):  # the folder holding cifar-10-batches-bin, or it itself
        data = cifar10.load_cifar10_patches(root, valid_size=3, download=False)
        for split in SPLITS:
            assert torch.equal(getattr(data, split), getattr(from_archive, split)), split
        err = capfd.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("note:"), err
        assert str(folder) in err and "not" in err and cifar10.ARCHIVE in err
    (folder / "data_batch_2.bin").write_bytes(cifar_records(range(3)))  # a record short
    with pytest.raises(DataError) as e:
        cifar10.load_cifar10_patches(folder, download=False)
    one_line(e, str(folder / "data_batch_2.bin"), "9219 bytes", "expected 12292")


def test_cifar_incomplete_extracted_folder_is_not_taken_for_the_data(tmp_path):
    archive = write_cifar(tmp_path / cifar10.ARCHIVE)
    folder = extract_cifar(archive, tmp_path / "root")
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DataError) as e:  # five of six files: the archive is asked for
        cifar10.load_cifar10_patches(folder.parent, download=False)
    one_line(e, cifar10.ARCHIVE, "downloading is off")


@needs_real
def test_mnist_ungzipped_files_are_checksummed(tmp_path, capfd):
    name = mnist.TRAIN_LABELS
    with gzip.open(REAL_DIR / name, "rb") as f:
        content = bytearray(f.read())
    content[-1] = (content[-1] + 1) % 10  # one label changed: a well-formed IDX file
    (tmp_path / name[:-3]).write_bytes(bytes(content))
    with pytest.raises(DataError) as e:
        mnist.load_mnist(tmp_path, download=False)
    one_line(e, str(tmp_path / name[:-3]), "checksum mismatch", mnist.RAW_SHA256[name])
    assert "note:" not in capfd.readouterr().err


def test_fashion_mnist_ungzipped_files_read_as_they_are(tmp_path, capfd):
    labels = (np.arange(60000) % 10).astype(np.uint8)
    images = np.zeros((60000, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(60000) % 256
    test_images = np.full((10000, 28, 28), 255, np.uint8)
    arrays = {
        fashion_mnist.TRAIN_IMAGES: images,
        fashion_mnist.TRAIN_LABELS: labels,
        fashion_mnist.TEST_IMAGES: test_images,
        fashion_mnist.TEST_LABELS: labels[:10000],
    }
    for name, array in arrays.items():
        header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        (tmp_path / name[:-3]).write_bytes(header + array.tobytes())
    data = fashion_mnist.load_fashion_mnist(tmp_path, valid_size=5, download=False)
    assert torch.equal(data.train[:, 0], torch.arange(59995, dtype=torch.uint8))
    assert torch.equal(data.valid_labels, torch.arange(59995, 60000) % 10)
    assert bool((data.test == 1).all())  # intensity 255 is ink with probability 1
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("note:"), err
    assert "train-images-idx3-ubyte" in err and "content is not" in err


@pytest.mark.usefixtures("no_proxy")
@pytest.mark.parametrize("name", ["mnist", "cifar10_patches", "omniglot"])
def test_missing_dataset_creates_no_folder(name, tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWVAE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load = DATASETS.get(name).load
    root = tmp_path / "data" / name
    for download in (False, True):  # downloading off, and a download that fails
        for where in (root, None):  # data.root, and the default ~/.cache/flowvae/<name>
            with pytest.raises(DataError) as e:
                load(root=where, download=download, mirrors=[closed_port_url()], progress=False)
            one_line(e, "is not in")
            assert not (tmp_path / "data").exists() and not (tmp_path / "home").exists()


def test_npz_that_is_not_an_npz_says_so(tmp_path):
    for content, needle in (
        (b"train,test\n1,2\n", "is not an .npz archive"),
        (b"", "is not an .npz archive"),
    ):
        path = tmp_path / "data.npz"
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            npz.load_npz(path)
        message = one_line(e, str(path), needle)
        assert "pickled" not in message
    np.save(tmp_path / "one.npy", np.zeros((2, 3, 3), np.uint8))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DataError) as e:
        npz.load_npz(tmp_path / "one.npz")
    one_line(e, "single .npy array", "not an .npz archive")
