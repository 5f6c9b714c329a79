"""The IDX loader: real MNIST as shipped, and one small hand-made broken directory per failure it must catch."""

import gzip
import hashlib
import os

import numpy as np
import pytest

from conftest import ROOT, idx_bytes, run_cli
import data
from data import FILES, DataError, load_idx

SHIPPED = os.path.join(ROOT, "data")


def write_dataset(folder, compress=True, checksums=False, n_train=5, n_test=3, seed=0):
    """Writes four small valid IDX files (28x28 images) into folder; returns the arrays written."""
    rng = np.random.default_rng(seed)
    train_labels = rng.integers(0, 10, n_train)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": train_labels,
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, train_labels.max() + 1, n_test),  # within the training labels' range
    }
    os.makedirs(folder, exist_ok=True)
    sums = []
    for key, array in arrays.items():
        raw = idx_bytes(array, 2051 if key.endswith("images") else 2049)
        write_file(folder, FILES[key], raw, compress)
        sums.append(f"{hashlib.sha256(raw).hexdigest()}  {FILES[key]}\n")
    if checksums:
        with open(os.path.join(folder, "SHA256SUMS"), "w") as f:
            f.writelines(sums)
    return arrays


def write_file(folder, name, raw, compress=True):
    for stale in (name, name + ".gz"):
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    if compress:
        with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
            f.write(raw)
    else:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(raw)


def test_gzip_and_raw_give_identical_arrays(tmp_path):
    written = write_dataset(tmp_path / "gz", compress=True)
    write_dataset(tmp_path / "raw", compress=False)
    from_gz, from_raw = load_idx(str(tmp_path / "gz")), load_idx(str(tmp_path / "raw"))
    for key, a, b in zip(FILES, from_gz, from_raw):
        assert a.dtype == np.uint8 and b.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, written[key])


def test_files_named_with_a_dot_before_idx_are_found(tmp_path):
    """Some copies of MNIST (and Fashion-MNIST) name their files train-images.idx3-ubyte."""
    written = write_dataset(tmp_path, compress=False)
    for name in FILES.values():
        os.rename(tmp_path / name, tmp_path / name.replace("-idx", ".idx"))
    for key, loaded in zip(FILES, load_idx(str(tmp_path))):
        np.testing.assert_array_equal(loaded, written[key])


def test_checksums_are_verified_when_present(tmp_path, monkeypatch):
    """Each of the four files is hashed against SHA256SUMS (the mismatch itself: further below)."""
    write_dataset(tmp_path, checksums=True)
    hashed, sha256 = [], hashlib.sha256
    monkeypatch.setattr(data.hashlib, "sha256", lambda raw: hashed.append(len(raw)) or sha256(raw))
    assert len(load_idx(str(tmp_path))[0]) == 5
    assert len(hashed) == 4


def expect_error(folder, *fragments):
    with pytest.raises(DataError) as raised:
        load_idx(str(folder))
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nowhere", "does not exist", "--data-dir")


def test_data_dir_naming_a_file(tmp_path):
    write_dataset(tmp_path)
    expect_error(tmp_path / "train-images-idx3-ubyte.gz", "is a file, not a folder", "--data-dir")


def test_missing_file(tmp_path):
    write_dataset(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    expect_error(tmp_path, "t10k-labels-idx1-ubyte.gz", "not found")


def test_a_folder_under_a_file_name(tmp_path):
    """Some archives unpack each file into a folder of the same name."""
    write_dataset(tmp_path, compress=False)
    name = "train-labels-idx1-ubyte"
    os.rename(tmp_path / name, tmp_path / "labels")
    os.mkdir(tmp_path / name)
    os.rename(tmp_path / "labels", tmp_path / name / name)
    expect_error(tmp_path, f"{tmp_path / name} is a folder, not the IDX file", "move the file")


def test_wrong_magic_number(tmp_path):
    arrays = write_dataset(tmp_path)
    # Labels stored under the images' name: magic 2049 where 2051 belongs.
    write_file(tmp_path, FILES["train_images"], idx_bytes(arrays["train_labels"], 2049))
    expect_error(tmp_path, "train-images-idx3-ubyte.gz", "magic number 2049 (type code 0x08, 1 dimension)",
                 "expected 2051 (3 dimensions)")


def test_wrong_data_type_code(tmp_path):
    arrays = write_dataset(tmp_path)
    float_magic = 0x0D01  # type code 0x0D (float32), 1 dimension
    write_file(tmp_path, FILES["test_labels"], idx_bytes(arrays["test_labels"], float_magic))
    expect_error(tmp_path, "t10k-labels-idx1-ubyte.gz", "type code 0x0D", "expected 2049")


@pytest.mark.parametrize("change, word", [(-1, "truncated"), (+3, "padded")])
def test_size_disagrees_with_header(tmp_path, change, word):
    arrays = write_dataset(tmp_path)
    raw = idx_bytes(arrays["train_images"], 2051)
    raw = raw[:change] if change < 0 else raw + b"\0" * change
    write_file(tmp_path, FILES["train_images"], raw)
    expect_error(tmp_path, "train-images-idx3-ubyte.gz", f"{len(raw)} bytes", word)


def test_too_short_for_a_header(tmp_path):
    write_dataset(tmp_path)
    write_file(tmp_path, FILES["test_images"], b"\0\0\x08")
    expect_error(tmp_path, "t10k-images-idx3-ubyte.gz", "too short")


def test_image_and_label_counts_disagree(tmp_path):
    arrays = write_dataset(tmp_path)
    write_file(tmp_path, FILES["train_labels"], idx_bytes(arrays["train_labels"][:4], 2049))
    expect_error(tmp_path, "holds 5 images", "holds 4 labels")


def test_label_out_of_range(tmp_path):
    arrays = write_dataset(tmp_path)
    labels = arrays["test_labels"].copy()
    labels[1] = 10
    write_file(tmp_path, FILES["test_labels"], idx_bytes(labels, 2049))
    expect_error(tmp_path, "t10k-labels-idx1-ubyte.gz", "label 10 at index 1")


def test_images_of_the_wrong_size(tmp_path):
    write_dataset(tmp_path)
    write_file(tmp_path, FILES["test_images"], idx_bytes(np.zeros((3, 32, 32)), 2051))
    expect_error(tmp_path, "32x32", "28x28")


def test_corrupt_gzip_stream(tmp_path):
    write_dataset(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip bits mid-stream: the deflate data or its CRC no longer fit
    path.write_bytes(bytes(data[:-6]))
    expect_error(tmp_path, "train-labels-idx1-ubyte.gz", "not a valid gzip file")


def test_checksum_mismatch_names_file_and_both_digests(tmp_path):
    arrays = write_dataset(tmp_path, checksums=True)
    changed = arrays["test_images"].copy()
    changed[0, 0, 0] ^= 1  # one bit: still a perfectly valid IDX file
    write_file(tmp_path, FILES["test_images"], idx_bytes(changed, 2051))
    expected_digest = hashlib.sha256(idx_bytes(arrays["test_images"], 2051)).hexdigest()
    actual_digest = hashlib.sha256(idx_bytes(changed, 2051)).hexdigest()
    expect_error(tmp_path, "t10k-images-idx3-ubyte.gz", expected_digest, actual_digest)


def test_malformed_checksum_file(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "SHA256SUMS").write_text("not a checksum line\n")
    expect_error(tmp_path, "SHA256SUMS", "line 1")


def test_shipped_data_passes_its_checksums_and_is_mnist():
    with open(os.path.join(SHIPPED, "SHA256SUMS")) as f:
        assert len(f.read().split()) == 8, "SHA256SUMS must list all four files"
    train_images, train_labels, test_images, test_labels = load_idx(SHIPPED)
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert train_images.dtype == np.uint8 and train_labels.shape == (60000,) and test_labels.shape == (10000,)
    assert list(train_labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert list(test_labels[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(train_labels).min() > 5000
    assert data.ink_span(train_images) == 20 / 28  # its digits scaled into a 20 x 20 box of 28 x 28


def test_ink_span_measures_how_much_of_the_frame_the_drawings_fill():
    """An image filled to its edges spans all of its frame; blank images are left out of the median.
    (MNIST's 20 of 28: test_shipped_data_passes_its_checksums_and_is_mnist.)"""
    images = np.zeros((5, 10, 12), np.uint8)
    images[:3, 2:7, 0:12] = 200  # three images 5 of 10 rows high but 12 of 12 columns wide
    assert data.ink_span(images) == 1.0
    images[:3, :, 3:9] = 0  # the middle columns blank: the box still spans every column
    assert data.ink_span(images) == 1.0
    images[:3, :, 9:] = 0
    assert data.ink_span(images) == 0.5  # columns 0..2 of 12 and rows 2..6 of 10: the rows' 5 of 10
    assert data.ink_span(np.zeros((4, 8, 8), np.uint8)) == 1.0


def test_model_refuses_a_broken_data_directory_in_one_line(tmp_path):
    write_dataset(tmp_path)
    os.remove(tmp_path / "train-images-idx3-ubyte.gz")
    result = run_cli("--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-images-idx3-ubyte.gz" in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()
