"""`gradstats analyze --compare-shapes`: the option's parsing and errors, real widths in
cifar_resnet, parameter counts against a closed form, and the JSON contract of a tiny two-shape
run (whose per-seed numbers must be analyze_variant's own)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import cli_error

from gradstats.models import cifar_resnet
from gradstats.models.cifar_resnet import stage_channels
from gradstats.tools.analyze import AnalysisConfig, analyze_variant
from gradstats.tools.cli import main as cli_main
from gradstats.tools.compare_shapes import DEFAULT_SHAPES, Shape, count_parameters, parse_shapes
from gradstats.tools.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_shapes():
    assert parse_shapes("56x1, 32x1.4,20X2") == (Shape(56, 1.0), Shape(32, 1.4), Shape(20, 2.0))
    assert [s.name for s in parse_shapes("default")] == DEFAULT_SHAPES.split(",")
    assert Shape(32, 1.4).channels == [22, 45, 90] and Shape(32, 1.4).blocks == 15


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no shapes given"),
        ("56", "'56' is not DEPTHxWIDTH"),
        ("56x", "'56x' is not DEPTHxWIDTH"),
        ("x1", "'x1' is not DEPTHxWIDTH"),
        ("56x1x2", "'56x1x2' is not DEPTHxWIDTH"),
        ("20x1,,32x1", "'' is not DEPTHxWIDTH"),
        ("56xwide", "'56xwide': width 'wide' is not a number"),
        ("30x1", "'30x1': depth 30 is not 6n \\+ 2"),
        ("2x1", "'2x1': depth 2 is not 6n \\+ 2"),
        ("20x0", "'20x0': width must be a positive number, got 0"),
        ("20x-1.5", "'20x-1.5': width must be a positive number, got -1.5"),
        ("20xnan", "'20xnan': width must be a positive number"),
        ("20xinf", "'20xinf': width must be a positive number"),
        ("20x0.01", "'20x0.01': width 0.01 leaves the first stage"),
        ("20x1,56x1,20x1.0", "'20x1.0' builds the same network as '20x1'"),
        ("20x1,20x1.007", "'20x1.007' builds the same network as '20x1'"),  # 16/32/64 again
    ],
)
def test_parse_shapes_errors(text, message):
    with pytest.raises(ValueError, match="--compare-shapes: " + message):
        parse_shapes(text)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--compare-shapes", "30x1"], "--compare-shapes: '30x1': depth 30 is not 6n \\+ 2"),
        (["--compare-shapes", "8x0"], "--compare-shapes: '8x0': width must be a positive number"),
        (["--compare-shapes", "8x1,8x1"], "'8x1' builds the same network as '8x1'"),
        (["--compare-shapes", "8x1", "--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--seeds", "2"], "--seeds applies only with --compare-shapes"),
        (["--compare-shapes", "8x1", "--depth", "20"], "drop --depth and --width"),
        (["--compare-shapes", "8x1", "--variants", "bn"], "drop --variants"),
        (["--compare-shapes", "8x1", "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_compare_shapes_cli_errors(argv, message, capsys):
    err = cli_error(["analyze", "--batches", "1"] + argv, capsys)
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_real_width_rounds_channels():
    assert stage_channels(1) == [16, 32, 64] and stage_channels(3) == [48, 96, 192]
    assert stage_channels(1.4) == [22, 45, 90] and stage_channels(0.56) == [9, 18, 36]
    model = cifar_resnet(14, width=1.4)
    assert model.conv1.out_channels == 22 and model.layer2[0].conv1.out_channels == 45
    assert model.fc.in_features == 90
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for bad in (0, -1, 0.01, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="width"):
            cifar_resnet(8, width=bad)


def _closed_form_parameters(depth: int, width: float, classes: int, preact: bool) -> int:
    """Parameters of a CIFAR ResNet from its layer list (3x3 convolutions without bias, BN weight
    and bias, 1x1 projection shortcuts where the shape changes, a linear head)."""
    c = [round(16 * width), round(32 * width), round(64 * width)]
    n = (depth - 2) // 6
    total = 27 * c[0] + (0 if preact else 2 * c[0])  # stem conv (+ its BN, post-activation)
    cin = c[0]
    for cout in c:
        for _ in range(n):
            total += 9 * cin * cout + 9 * cout * cout + 2 * cout  # two convs, the BN after conv1
            total += 2 * (cin if preact else cout)  # the other BN: before conv1 / after conv2
            if cin != cout:
                total += cin * cout + (0 if preact else 2 * cout)  # projection (+ its BN)
            cin = cout
    total += 2 * cin if preact else 0  # final BN
    return total + cin * classes + classes


@pytest.mark.parametrize("preact", [False, True], ids=["postact", "preact"])
@pytest.mark.parametrize("text", ["56x1,20x1.8,8x3.3,32x1.4", DEFAULT_SHAPES])
def test_parameter_counts(text, preact):
    counts = {}
    for shape in parse_shapes(text):
        expected = _closed_form_parameters(shape.depth, shape.width, 10, preact)
        counts[shape.name] = count_parameters(shape, 10, preact)
        assert counts[shape.name] == expected, (shape.name, counts[shape.name], expected)
        assert count_parameters(shape, 100, preact) == _closed_form_parameters(
            shape.depth, shape.width, 100, preact
        )
    print(counts)
    if text == DEFAULT_SHAPES:  # the default set is at about equal parameter count
        assert max(counts.values()) / min(counts.values()) < 1.02


def test_tiny_two_shape_run_json_contract(tmp_path, capsys):
    json_path, png_path = tmp_path / "shapes.json", tmp_path / "shapes.png"
    steps, seeds = 4, 2
    argv = ["analyze", "--compare-shapes", "8x0.5,14x0.25", "--seeds", seeds, "--steps", steps]
    argv += ["--batch-size", 8, "--batches", 1, "--seed", 5, "--json", json_path, "--plot", png_path]
    assert cli_main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "shapes compared" in out and "8x0.5" in out and "14x0.25" in out and "batch loss" in out

    result = json.loads(json_path.read_text())
    assert set(result) == {"config", "shapes"}
    config = result["config"]
    assert config["shapes"] == ["8x0.5", "14x0.25"] and config["seeds"] == seeds and config["steps"] == steps
    assert list(result["shapes"]) == ["8x0.5", "14x0.25"]
    data = load_dataset("builtin", seed=5)
    for name, depth, width in (("8x0.5", 8, 0.5), ("14x0.25", 14, 0.25)):
        r = result["shapes"][name]
        model = cifar_resnet(depth, width=width)
        assert r["params"] == sum(p.numel() for p in model.parameters())
        assert r["params"] == _closed_form_parameters(depth, width, 10, False)
        assert r["channels"] == [round(16 * width), round(32 * width), round(64 * width)]
        blocks = r["blocks"]
        assert len(blocks) == 3 * ((depth - 2) // 6)
        assert blocks[0]["position"] == 0 and blocks[-1]["position"] == 1
        assert all(a["position"] < b["position"] for a, b in zip(blocks, blocks[1:]))
        # Per seed, exactly what `analyze` measures for that seed; the shape's curve is their mean.
        for offset in range(seeds):
            alone = analyze_variant(
                "bn_skip",
                AnalysisConfig(depth=depth, width=width, batch_size=8, batches=1, seed=5 + offset),
                data,
            )
            assert [b["grad_var_seeds"][offset] for b in blocks] == [b["grad_var"] for b in alone["blocks"]]
            assert r["summary"]["first_over_last"]["values"][offset] == alone["summary"]["first_over_last"]
        for b in blocks:
            assert math.isclose(b["grad_var"], sum(b["grad_var_seeds"]) / seeds, rel_tol=1e-12)
            assert b["grad_var_over_last_min"] <= b["grad_var_over_last"] <= b["grad_var_over_last_max"]
        assert blocks[-1]["grad_var_over_last"] == 1.0
        assert len(set(blocks[0]["grad_var_seeds"])) == seeds, "seeds give different networks"
        # Within-stage ratios exist only with two or more blocks per stage.
        assert (r["summary"]["within_stage_ratio_max"] is None) == (depth == 8)

        train = r["train"]
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            stat = train["final"][key]
            assert len(stat["values"]) == seeds and stat["min"] <= stat["mean"] <= stat["max"]
            assert math.isclose(stat["mean"], sum(stat["values"]) / seeds, rel_tol=1e-12)
        for acc in train["final"]["test_accuracy"]["values"]:
            assert 0 <= acc <= 1 and math.isclose(acc * 359, round(acc * 359), abs_tol=1e-9)
        assert train["test_curve"]["step"] == [1, 2, 3, 4]
        assert train["test_curve"]["test_accuracy"]["mean"][-1] == train["final"]["test_accuracy"]["mean"]
        assert train["train_loss_curve"]["step"][-1] == steps
        for run in r["seeds"]:
            assert len(run["train_loss"]) == steps and all(math.isfinite(v) for v in run["train_loss"])
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_compare_shapes_default_set_without_training(capsys, monkeypatch):
    """The bare flag picks the default shapes; without --steps there is no training section."""
    import gradstats.tools.compare_shapes as compare

    monkeypatch.setattr(compare, "DEFAULT_SHAPES", "8x0.5,8x0.25")
    argv = ["analyze", "--compare-shapes", "--seeds", "1", "--batch-size", "4", "--batches", "1"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "8x0.5" in out and "8x0.25" in out and "test accuracy" not in out
