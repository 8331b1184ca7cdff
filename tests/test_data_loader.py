"""ImageFolder data at full size (sources.FolderStream): a folder of 40 random 300x300 PNG and
JPEG images in 2 classes streamed by a DataLoader at --image-size; the command end to end with
worker processes, memory that does not grow with the dataset, the transforms (random crops that
change from epoch to epoch, deterministic centre crops for evaluation), batches independent of
the number of workers, exact --resume, --image-size checks, and damaged images reported by name
from inside DataLoader workers."""

from __future__ import annotations

import gc
import os
import pickle
import re
import sys
import tracemalloc
import types

import numpy as np
import pytest
import torch
from conftest import cli_error, read_records, torchvision_or_skip

import gradstats.tools
from gradstats.tools.checkpoint import load_checkpoint
from gradstats.tools.cli import main as cli_main
from gradstats.tools.data import DataError, load_dataset
from gradstats.tools.sources import BatchPlan, FolderStream

Image = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

SIDE = 300
FAST = ["--model", "cifar_resnet", "--depth", "8", "--no-progress", "--no-tensorboard", "--device", "cpu"]


def _write_images(folder, count, seed, start=0):
    """``count`` random SIDE x SIDE RGB images in ``folder``, PNG and JPEG alternately."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / (f"{i}.png" if i % 2 else f"{i}.jpg"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 images in classes 'cat' and 'dog' (32 train / 8 test with the default split)."""
    torchvision_or_skip()
    root = tmp_path_factory.mktemp("folder")
    for label, name in enumerate(("cat", "dog")):
        _write_images(root / name, 20, seed=label)
    return root


def _stream(folder, *, batch=8, augment=True, size=32, workers=0, seed=0):
    return FolderStream(
        str(folder), BatchPlan(batch, seed=seed, augment=augment), image_size=size, workers=workers
    )


def test_command_runs_on_the_folder_with_workers(tmp_path, folder):
    out = tmp_path / "run"
    argv = ["--data", folder, "--image-size", 32, "--steps", 4, "--workers", 2, "--batch-size", 8]
    assert (
        cli_main(["train", "--out", str(out), *map(str, argv), "--log-every", "2", "--augment", *FAST]) == 0
    )
    records = read_records(out)
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["bn_layers"][0]["count"] == 2 * 8 * 32 * 32  # two batches of 8 at 32x32
    summary = (out / "summary.json").read_text()
    assert "32 train / 8 test images, 2 classes, 3x32x32 (streamed, 2 workers)" in summary


def _held_bytes(root) -> int:
    """Bytes of the tensors and numpy arrays reachable from ``root`` (tracemalloc does not see
    torch's allocations), walking object references but not into modules, classes or functions."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(
            obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
        ):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.untyped_storage().nbytes()
        elif isinstance(obj, np.ndarray):
            total += obj.nbytes
        else:
            stack.extend(gc.get_referents(obj))
    return total


def test_the_dataset_holds_paths_not_images(tmp_path, folder):
    """What the stream keeps (and ships to each worker) is a list of paths: 10x the files cost
    their names only, and no image data is held. The same measurements of the in-memory reader
    (load_dataset) show it growing with the images."""
    big = tmp_path / "big"
    for name in ("cat", "dog"):
        (big / name).mkdir(parents=True)
        for i in range(200):  # hard links to the 20 files: 400 images, no more disk
            src = sorted((folder / name).iterdir())[i % 20]
            os.link(src, big / name / f"{i}{src.suffix}")

    def python_bytes(make):
        tracemalloc.start()
        kept = make()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return size, _held_bytes(kept)

    small, small_tensors = python_bytes(lambda: _stream(folder))
    large, large_tensors = python_bytes(lambda: _stream(big))
    print(
        f"stream: Python {small / 1e3:.0f} / {large / 1e3:.0f} kB, tensors {small_tensors} / {large_tensors}"
    )
    assert large - small < 360 * 1000  # < 1 kB per extra file: its path, label, index
    assert large_tensors == small_tensors < 3 * 32 * 32 * 4  # not even one image, at any size
    assert len(pickle.dumps(_stream(big).train_set)) < 360 * 500
    # The in-memory reader holds every image as 3x32x32 float32.
    memory = load_dataset(str(big))
    print(f"load_dataset: tensors {_held_bytes(memory)} B")
    assert _held_bytes(memory) >= 400 * 3 * 32 * 32 * 4


def test_training_crops_vary_by_epoch_and_evaluation_is_a_centre_crop(folder):
    stream = _stream(folder, size=48)
    steps = stream.sampler.steps_per_epoch
    assert steps == 4  # 32 training images in batches of 8
    images, labels = stream.train_batch(0)
    assert images.shape == (8, 3, 48, 48) and images.dtype == torch.float32 and labels.shape == (8,)
    # Sample 0 of step 0 again in the next epoch: the same image, another random crop or flip.
    sample = stream.sampler.indices(0)[0].item()
    later = [
        (s, p) for s in range(steps, 2 * steps) for p, i in enumerate(stream.sampler.indices(s).tolist())
    ]
    step, position = next((s, p) for s, p in later if stream.sampler.indices(s)[p].item() == sample)
    again, again_labels = stream.train_batch(step)
    assert again_labels[position] == labels[0]
    assert not torch.equal(again[position], images[0])
    # And the same step twice gives the same batch (resume, another worker count: see below).
    assert torch.equal(_stream(folder, size=48).train_batch(step)[0], again)

    first = torch.cat([x for x, _ in stream.eval_batches(3)])
    second = torch.cat([x for x, _ in stream.eval_batches(5)])
    assert first.shape == (8, 3, 48, 48) and torch.equal(first, second)
    # The centre crop, computed here from the file with Pillow: shorter side to 55 (48 x 8/7),
    # then the middle 48 x 48 (55 - 48 = 7 columns left out: 4 before, 3 after, as torchvision
    # rounds 3.5); normalised with ImageNet's statistics.
    path, _ = stream.test_set.dataset.samples[stream.test_set.indices[0]]
    with Image.open(path) as image:
        resized = np.asarray(image.convert("RGB").resize((55, 55), Image.BILINEAR), dtype=np.float32) / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    centre = torch.from_numpy(resized[4:52, 4:52]).permute(2, 0, 1)
    expected = (centre - mean[:, None, None]) / std[:, None, None]
    error = (first[0] - expected).abs().max().item()
    print(f"centre crop: max abs difference from Pillow's {error:.2e}")
    assert error < 1e-5


def test_batches_do_not_depend_on_the_number_of_workers_or_processes(folder):
    """Each sample's crop is drawn from (seed, step, position): what a worker process computes
    equals what the main process computes, ranks 0 and 1 of two processes take the two halves of
    one process's batch, and a DataLoader started at step k (as after --resume) gives what one
    running from step 0 gives at k."""
    inline, workers = _stream(folder, workers=0), _stream(folder, workers=2)
    try:
        for step in range(6):
            a, b = inline.train_batch(step), workers.train_batch(step)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), step
        resumed = _stream(folder, workers=2)
        assert torch.equal(resumed.train_batch(5)[0], a[0])
        for rank in (0, 1):
            plan = BatchPlan(8, rank=rank, world_size=2, augment=True)
            half = FolderStream(str(folder), plan, image_size=32).train_batch(5)
            assert torch.equal(half[0], a[0][4 * rank : 4 * rank + 4])
            assert torch.equal(half[1], a[1][4 * rank : 4 * rank + 4])
    finally:
        workers.close()
        resumed.close()


def test_resume_on_the_folder_continues_exactly(tmp_path, folder):
    """Stopped at step 3 (mid-epoch) and resumed, with another number of workers, to step 6
    (into the next epoch): the same weights, optimizer state and records as 6 steps at once."""
    run = [
        "--data",
        folder,
        "--image-size",
        32,
        "--steps",
        8,
        "--batch-size",
        8,
        "--log-every",
        2,
        "--augment",
    ]
    run = [*map(str, run), *FAST]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli_main(["train", "--out", str(whole), "--stop-at", "6", "--workers", "2", *run]) == 0
    assert cli_main(["train", "--out", str(parts), "--stop-at", "3", "--workers", "0", *run]) == 0
    resume = ["train", "--out", str(parts), "--resume", "--stop-at", "6", "--workers", "2", "--no-progress"]
    assert cli_main([*resume, "--no-tensorboard"]) == 0
    a, b = load_checkpoint(str(whole / "checkpoint.pt")), load_checkpoint(str(parts / "checkpoint.pt"))
    assert a["step"] == b["step"] == 6
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    # The DataLoaders draw nothing from torch's global generator (whose state the checkpoint saves).
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    timing = ("images_per_s", "elapsed_s")
    records = [
        [{k: v for k, v in r.items() if k not in timing} for r in read_records(p)] for p in (whole, parts)
    ]
    assert records[0] == records[1] and [r["step"] for r in records[0]] == [2, 4, 6]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image-size", "4"], "--image-size must be at least 8, got 4"),
        (["--data", "builtin", "--image-size", "64"], "--image-size 64: applies to ImageFolder data"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
    ],
)
def test_bad_image_size_and_workers_are_named(tmp_path, capsys, folder, argv, message):
    argv = ["train", "--out", tmp_path / "run", "--data", folder, "--steps", "1", *FAST, *argv]
    assert message in cli_error(argv, capsys)


def test_missing_torchvision_names_the_extra(tmp_path, folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ImportError
    monkeypatch.delitem(sys.modules, "gradstats.tools.imagefolder", raising=False)
    monkeypatch.delattr(gradstats.tools, "imagefolder", raising=False)
    with pytest.raises(DataError, match=re.escape("pip install gradstats[data]")):
        _stream(folder)


def _damage(folder, kind):
    """A training folder of 16 good images and one bad one, and the bad file's path."""
    for split in ("train", "test"):
        _write_images(folder / split / "a", 8, seed=3)
        _write_images(folder / split / "b", 8, seed=4)
    bad = folder / "train" / "b" / "bad.jpg"
    if kind == "truncated":
        whole = (folder / "train" / "b" / "0.jpg").read_bytes()
        bad.write_bytes(whole[: len(whole) // 2])
    else:  # 400 megapixels of one-bit zeros: a few kB on disk, 1.2 GB decoded
        bad = bad.with_suffix(".png")
        Image.new("1", (20000, 20000)).save(bad, optimize=True)
    return bad


@pytest.mark.parametrize("kind, workers", [("truncated", 0), ("truncated", 2), ("bomb", 2)])
def test_damaged_image_is_named_from_a_worker(tmp_path, kind, workers):
    torchvision_or_skip()
    bad = _damage(tmp_path / "data", kind)
    stream = _stream(tmp_path / "data", batch=17, workers=workers)  # one step: every training image
    with pytest.raises(DataError) as error:
        stream.train_batch(0)
    message = str(error.value)
    print(message)
    assert message.startswith(f"{bad}: ") and "Traceback" not in message
    assert ("not a readable image" if kind == "truncated" else "decompression bomb") in message
    stream.close()


def test_damaged_image_stops_the_command_with_its_name(tmp_path, capsys):
    torchvision_or_skip()
    bad = _damage(tmp_path / "data", "truncated")
    argv = ["--data", tmp_path / "data", "--steps", "1", "--batch-size", "17", "--workers", "2"]
    message = cli_error(["train", "--out", tmp_path / "run", *argv, *FAST], capsys)
    assert f"{bad}: not a readable image" in message and "Traceback" not in message


def test_analyze_reads_the_folder_in_memory_at_32(tmp_path, folder, capsys):
    """`gradstats analyze` keeps the in-memory 32x32 reader for an ImageFolder."""
    argv = ["analyze", "--data", str(folder), "--depth", "8", "--variants", "bn_skip", "--batch-size", "8"]
    assert cli_main([*argv, "--batches", "1", "--json", str(tmp_path / "a.json")]) == 0
    assert "ImageFolder" in capsys.readouterr().out and (tmp_path / "a.json").exists()
