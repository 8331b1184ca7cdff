"""`gradstats train` writes only under --out and never through a link planted there: each output
(stats.jsonl, summary.json, the plots) is either replaced by a regular file or the run stops with
an error naming it; gradstats.tools.safe_files' helpers on their own."""

from __future__ import annotations

import os

import pytest
from conftest import cli_error

from gradstats.tools.cli import main as cli_main
from gradstats.tools.safe_files import open_in, refuse_link, replace_in

TRAIN = ["--steps", "4", "--log-every", "2", "--depth", "8", "--batch-size", "32"]
TRAIN += ["--no-tensorboard", "--no-progress", "--device", "cpu"]
SECRET = "outside --out: must stay as it is\n"
OUTPUTS = ("stats.jsonl", "summary.json", "grad_var_heatmap.png", "grad_var_blocks.png")


def _outside(tmp_path, name):
    target = tmp_path / f"victim-{name}"
    target.write_text(SECRET)
    return target


def _plant(out, name, target):
    os.makedirs(out, exist_ok=True)
    if os.path.lexists(out / name):
        os.unlink(out / name)
    os.symlink(target, out / name)


def _stopped_run(out):
    """A run stopped at step 2 with a checkpoint, to --resume."""
    assert cli_main(["train", "--out", str(out), *TRAIN, "--stop-at", "2"]) == 0


@pytest.mark.parametrize("name", OUTPUTS)
def test_fresh_run_replaces_a_planted_link(tmp_path, name):
    # Fresh run: every output is a new file renamed over its name, so the link is replaced.
    out, target = tmp_path / "run", _outside(tmp_path, name)
    _plant(out, name, target)
    assert cli_main(["train", "--out", str(out), *TRAIN]) == 0
    assert target.read_text() == SECRET
    assert not os.path.islink(out / name) and os.path.getsize(out / name) > 0


def test_resume_replaces_planted_summary_and_plot_links(tmp_path):
    out = tmp_path / "run"
    _stopped_run(out)
    targets = {}
    for name in OUTPUTS[1:]:
        targets[name] = _outside(tmp_path, name)
        _plant(out, name, targets[name])
    assert cli_main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    for name, target in targets.items():
        assert target.read_text() == SECRET
        assert not os.path.islink(out / name)


def test_resume_refuses_a_planted_stats_link(tmp_path, capsys):
    # On --resume stats.jsonl is read and cut back: reading it through a link would copy another
    # file into the run folder, so the run stops instead, naming the file.
    out = tmp_path / "run"
    _stopped_run(out)
    target = _outside(tmp_path, "stats")
    _plant(out, "stats.jsonl", target)
    error = cli_error(["train", "--out", out, "--resume", "--no-progress"], capsys)
    assert str(out / "stats.jsonl") in error and "link" in error
    assert target.read_text() == SECRET


def test_tensorboard_link_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    os.makedirs(tmp_path / "elsewhere")
    _plant(out, "tensorboard", tmp_path / "elsewhere")
    argv = ["train", "--out", out, *[a for a in TRAIN if a != "--no-tensorboard"]]
    error = cli_error(argv, capsys)
    assert str(out / "tensorboard") in error and "link" in error
    assert os.listdir(tmp_path / "elsewhere") == []


# -- the helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["a", "w", "r"])
def test_open_in_refuses_a_link(tmp_path, mode):
    target = _outside(tmp_path, "x")
    os.symlink(target, tmp_path / "log")
    with pytest.raises(OSError, match="link") as info:
        open_in(str(tmp_path), "log", mode)
    assert str(tmp_path / "log") in str(info.value)
    assert target.read_text() == SECRET


def test_open_in_appends_and_creates(tmp_path):
    with open_in(str(tmp_path), "log", "a") as f:
        f.write("one\n")
    with open_in(str(tmp_path), "log", "a") as f:
        f.write("two\n")
    assert (tmp_path / "log").read_text() == "one\ntwo\n"


def test_open_in_refuses_a_second_hard_link(tmp_path):
    target = _outside(tmp_path, "x")
    os.link(target, tmp_path / "log")
    with pytest.raises(OSError, match="hard link"):
        open_in(str(tmp_path), "log", "a")
    assert target.read_text() == SECRET


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "../x", "x\0"])
def test_names_with_path_parts_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="name"):
        open_in(str(tmp_path), name, "w")
    with pytest.raises(ValueError, match="name"):
        replace_in(str(tmp_path), name, lambda f: None)


def test_replace_in_replaces_a_link_and_leaves_no_temporary(tmp_path):
    target = _outside(tmp_path, "x")
    os.symlink(target, tmp_path / "out.json")
    replace_in(str(tmp_path), "out.json", lambda f: f.write("{}"))
    assert target.read_text() == SECRET
    assert (tmp_path / "out.json").read_text() == "{}" and not os.path.islink(tmp_path / "out.json")
    assert oct(os.stat(tmp_path / "out.json").st_mode & 0o777) == oct(0o644)
    with pytest.raises(RuntimeError):
        replace_in(str(tmp_path), "out.json", lambda f: (_ for _ in ()).throw(RuntimeError("boom")))
    assert (tmp_path / "out.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["out.json", "victim-x"]


def test_refuse_link(tmp_path):
    refuse_link(str(tmp_path), "absent")
    os.symlink(tmp_path, tmp_path / "tb")
    with pytest.raises(OSError, match="link"):
        refuse_link(str(tmp_path), "tb")
