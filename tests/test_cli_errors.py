"""Options a user can get wrong in ways argparse's types let through: each gives a one-line error
naming the option (exit status 2), before any training starts, instead of a silent default, a
NaN run or a traceback."""

from __future__ import annotations

import pytest
from conftest import cli_error

from gradstats.extras import MissingExtra
from gradstats.tools import analyze


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--steps", "0"], "--steps must be at least 1"),  # 0 used to mean: the default 10 epochs
        (["--lr", "nan"], "--lr"),
        (["--momentum", "1.5"], "--momentum"),
        (["--width", "0"], "--width"),
        (["--schedule", "step", "--milestones", ","], "--milestones"),
    ],
)
def test_train_options_refused_before_training(tmp_path, capsys, extra, expected):
    err = cli_error(["train", "--out", tmp_path / "run", "--depth", "8", *extra], capsys)
    print(err)
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "run" / "stats.jsonl").exists()  # refused before the run began


def test_out_that_is_a_file_names_the_option(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    err = cli_error(["train", "--out", tmp_path / "file", "--steps", "1", "--depth", "8"], capsys)
    print(err)
    assert "--out" in err and "Traceback" not in err


def test_a_missing_optional_package_is_a_one_line_error(monkeypatch, capsys):
    def missing(args):
        raise MissingExtra("--plot needs matplotlib; install it with: pip install 'gradstats[plot]'")

    monkeypatch.setattr(analyze, "main", missing)
    err = cli_error(["analyze", "--depth", "8"], capsys)
    assert "gradstats[plot]" in err and "Traceback" not in err
