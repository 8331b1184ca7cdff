"""Untrusted inputs: shared dataset folders must not run code or exhaust memory when opened.
Each test uses a real malicious payload (a pickle that would touch a marker file, a PNG declaring
400 megapixels, a JPEG cut in half); the run report's escaping is tested in test_report.py."""

from __future__ import annotations

import os
import pathlib
import pickle
import re

import numpy as np
import pytest

from gradstats.tools.data import MAX_IMAGE_PIXELS, DataError, load_dataset
from gradstats.tools.safe_pickle import UnsafePickleError, load_restricted_pickle

Image = pytest.importorskip("PIL.Image")


class _TouchOnLoad:
    """Unpickling this calls ``function(*args)``: the classic pickle code-execution payload."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _payloads(marker: pathlib.Path):
    return {
        "os.system": _TouchOnLoad(os.system, f"touch {marker}"),
        "pathlib.Path.touch": _TouchOnLoad(pathlib.Path.touch, marker),
        "eval": _TouchOnLoad(eval, f"open({str(marker)!r}, 'w').close()"),
    }


def _cifar_folder(root: pathlib.Path, data_batch_1) -> None:
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, batch in (
        ("data_batch_1", data_batch_1),
        ("test_batch", {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}),
    ):
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize("payload", ["os.system", "pathlib.Path.touch", "eval"])
@pytest.mark.parametrize("where", ["top", "nested"])
def test_malicious_cifar_batch_runs_nothing(tmp_path, payload, where):
    marker = tmp_path / "MARKER"
    evil = _payloads(marker)[payload]
    batch = evil if where == "top" else {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, evil, 2, 3]}
    # the payload works: plain pickle.load runs it
    pickle.loads(pickle.dumps(batch, protocol=2))
    assert marker.exists()
    marker.unlink()

    root = tmp_path / "cifar-10-batches-py"
    _cifar_folder(root, batch)
    with pytest.raises(DataError) as error:
        load_dataset(str(tmp_path))
    assert not marker.exists(), "unpickling the batch ran the payload"
    message = str(error.value)
    assert str(root / "data_batch_1") in message and "refused" in message
    print(message)


def test_restricted_unpickler_reads_real_format_batches(tmp_path):
    """The CIFAR tarball's batches were written by Python 2 (pickle protocol 2, numpy 1.x):
    byte strings as BINSTRING, the array rebuilt by numpy.core.multiarray._reconstruct. Written
    here with pickle's pure-Python pickler changed to do exactly that; also protocols 2-5 as
    Python 3 writes them (bytes via _codecs.encode, numpy._core, _frombuffer)."""
    rng = np.random.default_rng(1)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": rng.integers(0, 10, 6).tolist(),
        b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
        b"filenames": [b"a.png", b"b.png"],
    }

    class Python2Pickler(pickle._Pickler):
        dispatch = pickle._Pickler.dispatch.copy()

        def save_str2(self, obj):  # Python 2's str: SHORT_BINSTRING / BINSTRING
            n = len(obj)
            if n < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
            else:
                self.write(pickle.BINSTRING + n.to_bytes(4, "little") + obj)
            self.memoize(obj)

        dispatch[bytes] = save_str2

    import io

    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(batch)
    python2 = buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in python2 and b"_codecs" not in python2
    variants = {"python2": python2}
    variants.update({f"protocol{p}": pickle.dumps(batch, protocol=p) for p in (2, 3, 4, 5)})
    for name, blob in variants.items():
        path = tmp_path / name
        path.write_bytes(blob)
        loaded = load_restricted_pickle(str(path))
        assert loaded[b"labels"] == batch[b"labels"] and loaded[b"filenames"] == batch[b"filenames"], name
        assert np.array_equal(loaded[b"data"], batch[b"data"]) and loaded[b"data"].dtype == np.uint8, name


def test_restricted_unpickler_refuses_object_arrays(tmp_path):
    path = tmp_path / "objects"
    path.write_bytes(pickle.dumps(np.array([1, "x"], dtype=object), protocol=2))
    with pytest.raises(UnsafePickleError, match=f"{re.escape(str(path))}.*object dtype"):
        load_restricted_pickle(str(path))


def test_decompression_bomb_png_is_refused_without_decoding(tmp_path):
    # 20000 x 20000 one-bit zeros: a few kilobytes on disk, 400 megapixels (1.2 GB as RGB) decoded
    (tmp_path / "cls").mkdir()
    bomb = tmp_path / "cls" / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 200_000 and 20000 * 20000 > 2 * Image.MAX_IMAGE_PIXELS
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(DataError, match=f"{re.escape(str(bomb))}.*decompression bomb"):
        load_dataset(str(tmp_path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6, f"refusing the bomb allocated {peak / 1e6:.0f} MB"


def test_image_over_our_limit_but_under_pillows_is_refused(tmp_path):
    (tmp_path / "cls").mkdir()
    side = int(MAX_IMAGE_PIXELS**0.5) + 16  # over our limit, under Pillow's warning threshold
    assert side * side < Image.MAX_IMAGE_PIXELS
    big = tmp_path / "cls" / "big.png"
    Image.new("1", (side, side)).save(big)
    with pytest.raises(DataError, match=f"{re.escape(str(big))}.*refused before decoding"):
        load_dataset(str(tmp_path))


def test_truncated_jpeg_is_reported_naming_the_file(tmp_path):
    (tmp_path / "cls").mkdir()
    rng = np.random.default_rng(2)
    whole = tmp_path / "cls" / "whole.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole, quality=90)
    cut = tmp_path / "cls" / "cut.jpg"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{re.escape(str(cut))}: not a readable image"):
        load_dataset(str(tmp_path))
    cut.unlink()
    assert load_dataset(str(tmp_path), test_fraction=0).train_images.shape == (1, 3, 32, 32)


def test_non_image_with_image_suffix_is_reported(tmp_path):
    (tmp_path / "cls").mkdir()
    fake = tmp_path / "cls" / "fake.png"
    fake.write_bytes(b"#!/bin/sh\necho not an image\n")
    with pytest.raises(DataError, match=f"{re.escape(str(fake))}: not a readable image"):
        load_dataset(str(tmp_path))


# -- static rules over the package source ---------------------------------------------------------

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gradstats"


def _sources():
    return sorted(p for p in _PACKAGE.rglob("*.py"))


@pytest.mark.parametrize(
    "pattern, why",
    [
        (r"\bpickle\.loads?\(", "unpickle only with gradstats.tools.safe_pickle.load_restricted_pickle"),
        (r"\b_?Unpickler\(", "only safe_pickle.RestrictedUnpickler may unpickle"),
        (r"\bCIFAR(10|100)\(", "torchvision's CIFAR readers call pickle.load on the folder"),
        (r"allow_pickle\s*=\s*True", "np.load with allow_pickle unpickles"),
        (r"weights_only\s*=\s*False", "torch.load without weights_only unpickles"),
        (r"(?<![.\w])(eval|exec)\(", "no code from data"),
    ],
)
def test_package_source_reads_no_pickle_unsafely(pattern, why):
    offenders = []
    for path in _sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                offenders.append(f"{path.relative_to(_PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, f"{why}:\n" + "\n".join(offenders)


def test_every_torch_load_is_weights_only():
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\btorch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # to the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start() : end + 1]
            assert "weights_only=True" in call, f"{path}: {call}"


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_files_are_refused_not_read(tmp_path, kind):
    (tmp_path / "cls").mkdir()
    path = tmp_path / "cls" / "a.png"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    else:
        path.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: not a regular file"):
        load_dataset(str(tmp_path))
