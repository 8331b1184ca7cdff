"""The public API: every exported name exists and the README's API section documents it."""

import pathlib

import pytest
import torch
from conftest import cli_error

import gradstats

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_exports_exist():
    missing = [name for name in gradstats.__all__ if not hasattr(gradstats, name)]
    assert not missing, f"gradstats.__all__ names that do not exist: {missing}"


def test_readme_documents_every_export():
    text = README.read_text(encoding="utf-8")
    api = text[text.index("## API") :]
    undocumented = [name for name in gradstats.__all__ if f"`{name}" not in api and f"{name}(" not in api]
    assert not undocumented, f"exported but not in the README's API section: {undocumented}"


@pytest.mark.parametrize("command", [["demo"], ["bench"], ["analyze"], ["train", "--out", "unused"]])
@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "--device 'tpu': not a device"),
        ("meta", "--device 'meta': gradstats runs on cpu or cuda"),
        pytest.param(
            "cuda",
            "--device 'cuda': CUDA is not available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_every_command_rejects_a_device_it_cannot_use(
    command, device, message, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # train would create its output folder here
    err = cli_error([*command, "--device", device], capsys)
    assert f"gradstats {command[0]}: error: {message}" in err, err
    assert not (tmp_path / "unused").exists()
