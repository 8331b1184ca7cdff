"""`gradstats train --per-sample` and `gradstats analyze --per-sample`: the noise scale, GSNR and
dy variance split reach stats.jsonl, summary.json, the plots, the metrics names and the analysis
table, equal to what the library computes from the same records."""

from __future__ import annotations

import json
import math

import pytest
from conftest import read_records, train_quietly

from gradstats.records import model_noise_scale
from gradstats.sample_stats import FIELDS as SAMPLE_FIELDS
from gradstats.tools.cli import main as cli_main
from gradstats.tools.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _nan(value):
    """JSON writes NaN as null: read it back as NaN."""
    return math.nan if value is None else value


def test_train_per_sample_records_noise_scale(tmp_path):
    summary = train_quietly(out=str(tmp_path), depth=8, batch_size=32, steps=6, log_every=2, per_sample=True)
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        for layer in r["bn_layers"]:
            assert set(SAMPLE_FIELDS) <= set(layer)
            assert layer["samples"] == 2 * 32  # the interval's samples (reset after each record)
            assert layer["trace_sigma"] > 0
            assert 0 <= layer["dy_between_fraction"] <= 1
        # The model's B_simple is the layers' traces over their norms, added up (NaN, written
        # as null, when the |G|^2 estimate is not positive).
        assert _nan(r["noise_scale"]) == pytest.approx(
            model_noise_scale(r["bn_layers"]), rel=1e-12, nan_ok=True
        )
    assert summary["noise_scale"] == [[r["step"], r["noise_scale"]] for r in records]
    assert (tmp_path / "noise_scale.png").read_bytes().startswith(PNG)
    config = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert config["per_sample"] is True
    html = open(write_report(str(tmp_path)), encoding="utf-8").read()
    assert "gradient noise scale B_simple" in html or "no positive noise-scale estimate" in html
    # With positive estimates the figure is drawn.
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    rewritten = [
        json.dumps({**json.loads(line), "noise_scale": 10.0 * (i + 1)}) for i, line in enumerate(lines)
    ]
    (tmp_path / "stats.jsonl").write_text("\n".join(rewritten) + "\n")
    html = open(write_report(str(tmp_path)), encoding="utf-8").read()
    assert "gradient noise scale B_simple over training" in html
    assert "no positive noise-scale estimate" not in html


def test_train_without_per_sample_has_no_such_fields(tmp_path):
    train_quietly(out=str(tmp_path), depth=8, batch_size=16, steps=2, log_every=2)
    (record,) = read_records(tmp_path)
    assert "noise_scale" not in record and "trace_sigma" not in record["bn_layers"][0]
    assert not (tmp_path / "noise_scale.png").exists()
    assert "noise scale" not in open(write_report(str(tmp_path)), encoding="utf-8").read()


def test_resume_keeps_per_sample_a_run_setting(tmp_path, capsys):
    train_quietly(out=str(tmp_path), depth=8, batch_size=16, steps=4, log_every=2, stop_at=2, per_sample=True)
    code = cli_main(
        ["train", "--resume", "--out", str(tmp_path), "--no-progress", "--no-tensorboard", "--device", "cpu"]
    )
    assert code == 0
    records = read_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4] and all("noise_scale" in r for r in records)


def test_analyze_per_sample_table_and_json(tmp_path, capsys):
    path = tmp_path / "a.json"
    args = ["analyze", "--depth", "8", "--variants", "bn_skip,plain", "--batch-size", "16"]
    assert cli_main(args + ["--batches", "2", "--per-sample", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "noise scale B_simple" in out and "model (every BN parameter): B_simple" in out
    result = json.loads(path.read_text())
    bn_skip = result["variants"]["bn_skip"]
    for block in bn_skip["blocks"]:
        assert block["noise_scale"] is None or block["noise_scale"] > 0
        assert 0 <= block["dy_between_fraction"] <= 1
    layers = bn_skip["bn_layers"]
    assert all(layer["samples"] == 32 for layer in layers)  # 2 batches of 16
    layers = [{k: _nan(v) for k, v in layer.items()} for layer in layers]
    assert _nan(bn_skip["summary"]["noise_scale"]) == pytest.approx(
        model_noise_scale(layers), rel=1e-12, nan_ok=True
    )
    # A network without BN has nothing to split by sample.
    plain = result["variants"]["plain"]
    assert plain["summary"]["noise_scale"] is None and "noise_scale" not in plain["blocks"][0]
    # Without the flag: no per-sample keys.
    assert cli_main(args + ["--batches", "1", "--json", str(path)]) == 0
    again = json.loads(path.read_text())["variants"]["bn_skip"]
    assert "noise_scale" not in again["summary"] and "noise_scale" not in again["blocks"][0]
    assert math.isfinite(again["summary"]["first_over_last"])


def test_report_reads_untrusted_per_sample_values_as_missing(tmp_path):
    # A run folder is untrusted input: a noise scale that is a string, a layer entry that is
    # not an object, a name that is a list must not crash the report (they read as missing).
    record = {
        "step": 1,
        "train_loss": 1.0,
        "noise_scale": "huge",
        "bn_layers": [{"name": ["x"], "noise_scale": 5.0}, "junk"],
        "blocks": [],
    }
    second = {**record, "step": 2, "noise_scale": 7.0, "bn_layers": [{"name": ["x"], "noise_scale": "7"}]}
    (tmp_path / "stats.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(second) + "\n")
    html = open(write_report(str(tmp_path)), encoding="utf-8").read()
    assert "gradient noise scale B_simple over training" in html
