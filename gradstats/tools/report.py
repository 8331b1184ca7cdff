"""`gradstats report RUN_DIR [--out PATH]`: one self-contained HTML page from what `gradstats
train` wrote to RUN_DIR (stats.jsonl, and summary.json once the run has finished): per-layer dy
and dx variance heat maps over training, gradient variance per residual block (heat map and
curves), training curves, the alerts, the per-layer statistics of the last record and the run's
configuration. A run still in progress (no summary.json yet) gets a report from stats.jsonl alone.

Run folders are shared, so everything read from one is untrusted:
- every string from RUN_DIR reaches the page only through ``html.escape(..., quote=True)``
  (``_cell``), text and attributes alike;
- images are PNGs drawn here (matplotlib's Agg renderer, LaTeX off, mathtext off for names) and
  embedded as ``data:image/png;base64`` URIs; the page has no script, no external stylesheet,
  font or URL, and a Content-Security-Policy that forbids loading anything else;
- nothing read from RUN_DIR becomes part of a path (summary.json's "plots" are not opened);
  the page is written to --out only, through a temporary file renamed over it, so a symlink
  planted at that name is replaced, not followed.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import DataError
from .logs import STATS_FILE, finite_number, noise_scale_series
from .plots import block_variance_curves, noise_scale_curves, variance_heatmap
from .safe_files import replace_in

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
_LABEL_CHARS = 48  # longer layer names are shortened in plot labels (the tables show them whole)
_MAX_LABELS = 60  # at most this many tick labels per axis; every k-th name beyond that


class LayerSeries:
    """One statistic (``key``) of the layers in a record group ("bn_layers" or "blocks") over
    the records, gathered as they are read (a long run's records kept whole would take
    gigabytes): layer names in order of first appearance, one column of values per record."""

    def __init__(self, group: str, key: str) -> None:
        self.group, self.key = group, key
        self.index: dict[str, int] = {}
        self.columns: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, record: dict[str, Any]) -> None:
        rows, values = [], []
        for entry in _entries(record, self.group):
            rows.append(self.index.setdefault(entry["name"], len(self.index)))
            values.append(finite_number(entry.get(self.key)))
        self.columns.append((np.array(rows, dtype=np.int64), np.array(values, dtype=np.float64)))

    @property
    def names(self) -> list[str]:
        return list(self.index)

    def matrix(self) -> np.ndarray:
        """[layers, records] float64, NaN where a record has no finite value for a layer."""
        values = np.full((len(self.index), len(self.columns)), np.nan)
        for column, (rows, column_values) in enumerate(self.columns):
            values[rows, column] = column_values
        return values


_SERIES = (("bn_layers", "dy_var"), ("bn_layers", "dx_var"), ("blocks", "grad_var"))


@dataclass
class Run:
    """What a run folder holds: per record the step, training loss and accuracy and the layers'
    variances (``series``, keyed by (group, key)), the last record whole, summary.json (None while
    the run is in progress) and remarks about how they were read."""

    folder: str
    steps: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    noise_records: list[dict[str, Any]] = field(default_factory=list)  # those of --per-sample runs
    series: dict[tuple[str, str], LayerSeries] = field(
        default_factory=lambda: {(group, key): LayerSeries(group, key) for group, key in _SERIES}
    )
    last_record: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.steps.append(record["step"])
        self.train_loss.append(finite_number(record.get("train_loss")))
        self.train_acc.append(finite_number(record.get("train_acc")))
        if "noise_scale" in record:
            self.noise_records.append(record)
        for series in self.series.values():
            series.add(record)
        self.last_record = record

    def layer_matrix(self, group: str, key: str):
        """(names, steps, values [layers, records]) of one series."""
        series = self.series[(group, key)]
        return series.names, self.steps, series.matrix()


# -- reading --------------------------------------------------------------------------------------


def read_run(folder: str) -> Run:
    """The run in ``folder``; DataError naming the file when stats.jsonl is missing or either
    file is not what `gradstats train` writes."""
    if not os.path.isdir(folder):
        raise DataError(f"RUN_DIR {folder!r}: not a folder (expected the --out folder of gradstats train)")
    stats_path = os.path.join(folder, STATS_FILE)
    if not os.path.isfile(stats_path):
        raise DataError(f"{stats_path}: no such file; RUN_DIR must be the --out folder of gradstats train")
    run = Run(folder)
    _read_records(stats_path, run)
    run.summary = _read_summary(os.path.join(folder, SUMMARY_FILE))
    if run.summary is None:
        run.notes.append(
            f"No {SUMMARY_FILE}: the run is still in progress or was interrupted; this report is "
            f"built from {STATS_FILE} alone (no configuration, evaluation or alerts yet)."
        )
    return run


def _read_records(path: str, run: Run) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:
                if not line.endswith("\n"):  # the last line, unfinished: being written, or cut short
                    run.notes.append(
                        f"The last line of {STATS_FILE} is incomplete (being written?) and was left out."
                    )
                    break
                raise DataError(f"{path}, line {number}: not a JSON record ({error})") from None
            if not isinstance(record, dict) or math.isnan(finite_number(record.get("step"))):
                raise DataError(f"{path}, line {number}: expected a JSON object with a numeric 'step'")
            run.add(record)


def _read_summary(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (ValueError, RecursionError) as error:
        raise DataError(f"{path}: not JSON ({error})") from None
    if not isinstance(summary, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    alerts = summary.get("alerts")
    if alerts is not None and not isinstance(alerts, list):
        raise DataError(f"{path}: 'alerts' must be a list of objects, got {type(alerts).__name__}")
    return summary


def _entries(record: dict[str, Any], group: str) -> list[dict[str, Any]]:
    entries = record.get(group)
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]


def layer_matrix(records: list[dict[str, Any]], group: str, key: str):
    """(names, steps, values [len(names), len(steps)]) of ``key`` for the layers of ``group``
    ("bn_layers" or "blocks") over ``records``; layers in order of first appearance, NaN where a
    record lacks a value."""
    series = LayerSeries(group, key)
    for record in records:
        series.add(record)
    return series.names, [record["step"] for record in records], series.matrix()


# -- plots ----------------------------------------------------------------------------------------


def _label(name: str) -> str:
    return name if len(name) <= _LABEL_CHARS else name[: _LABEL_CHARS - 3] + "..."


def _png(fig) -> str:
    """The figure as a data URI (PNG, base64)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _ticks(count: int):
    every = max(1, math.ceil(count / _MAX_LABELS))
    return list(range(0, count, every))


def _heatmap(names, steps, values, title: str) -> str | None:
    if not names or not np.isfinite(values).any():
        return None
    ticks = _ticks(len(names))
    return _png(variance_heatmap(names, steps, values, title, ticks, [_label(names[i]) for i in ticks]))


def _block_curves(names, steps, values) -> str | None:
    if not names or not np.isfinite(values).any():
        return None
    ticks = _ticks(len(names))
    fig = block_variance_curves(
        names,
        steps,
        values,
        sorted({0, len(steps) // 2, len(steps) - 1}),
        ticks,
        [_label(names[i]) for i in ticks],
        "gradient variance per block: first, middle and last logged steps",
    )
    return _png(fig)


def _evaluations(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """summary.json's "eval" entries that are objects with a numeric step."""
    evals = (summary or {}).get("eval")
    if not isinstance(evals, list):
        return []
    return [e for e in evals if isinstance(e, dict) and not math.isnan(finite_number(e.get("step")))]


def _training_curves(run: Run) -> str | None:
    from matplotlib.figure import Figure

    steps, loss, acc = run.steps, run.train_loss, run.train_acc
    evals = _evaluations(run.summary)
    if not any(math.isfinite(v) for v in loss + acc) and not evals:
        return None
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    left.plot(steps, loss, "o-", ms=3, label="train (interval)")
    right.plot(steps, acc, "o-", ms=3, label="train (interval)")
    if evals:
        eval_steps = [e["step"] for e in evals]
        left.plot(eval_steps, [finite_number(e.get("test_loss")) for e in evals], "s--", ms=4, label="test")
        right.plot(eval_steps, [finite_number(e.get("test_acc")) for e in evals], "s--", ms=4, label="test")
    for ax, what in ((left, "loss"), (right, "accuracy")):
        ax.set_xlabel("training step")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def _noise_scale(run: Run) -> str | None:
    steps, noise, loss, layers = noise_scale_series(run.noise_records)
    if not any((np.isfinite(v) & (v > 0)).any() for v in [noise, *layers.values()]):
        return None
    return _png(noise_scale_curves(steps, noise, loss, layers, "noise scale against training loss"))


# -- HTML -----------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """Any value from the run folder as escaped HTML text (the one way such values reach the page)."""
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return html.escape(text, quote=True)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _figure(uri: str | None, caption: str, missing: str) -> str:
    if uri is None:
        return f"<p class='note'>{html.escape(missing)}</p>\n"
    assert uri.startswith("data:image/png;base64,")
    alt = html.escape(caption, quote=True)
    return f'<figure><img src="{uri}" alt="{alt}"><figcaption>{alt}</figcaption></figure>\n'


def _alerts(summary: dict[str, Any] | None) -> str:
    alerts = (summary or {}).get("alerts")
    if not alerts:
        return "<p>no alerts recorded</p>\n"
    rows = []
    for alert in alerts:
        if isinstance(alert, dict):
            rows.append([alert.get("step"), alert.get("kind"), alert.get("layer"), alert.get("message")])
        else:
            rows.append([None, None, None, alert])
    return _table(["step", "kind", "layer", "message"], rows)


def _last_layers(last: dict[str, Any] | None) -> str:
    if last is None:
        return "<p>no records</p>\n"
    layers = [
        [
            e["name"],
            e.get("channels"),
            e.get("dy_var"),
            e.get("dx_var"),
            e.get("dy_nonfinite"),
            e.get("dx_nonfinite"),
        ]
        for e in _entries(last, "bn_layers")
    ]
    blocks = [
        [e["name"], e.get("channels"), e.get("grad_var"), e.get("grad_nonfinite")]
        for e in _entries(last, "blocks")
    ]
    return (
        f"<p>step {_cell(last['step'])}; variances are means over channels</p>\n"
        + _table(
            ["BatchNorm layer", "channels", "dy var", "dx var", "dy non-finite", "dx non-finite"], layers
        )
        + _table(["residual block", "channels", "gradient var", "non-finite"], blocks)
    )


_OVERVIEW_KEYS = (
    "data",
    "device",
    "world_size",
    "parameters",
    "steps",
    "epochs",
    "elapsed_s",
    "images_per_s",
    "final_train_loss",
    "final_train_acc",
    "final_test_loss",
    "final_test_acc",
)

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; }
figure { margin: 1em 0; }
.note { background: #fff6d5; padding: 0.5em 1em; border-left: 4px solid #e0b000; }
"""

# Defence in depth behind the escaping: no script, nothing fetched; only inline style and data: images.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def render_html(run: Run) -> str:
    """The report page of ``run`` (see the module docstring for what it holds and the rules)."""
    import matplotlib

    summary = run.summary
    with matplotlib.rc_context({"text.usetex": False}), np.errstate(all="ignore"):
        bn_dy = run.layer_matrix("bn_layers", "dy_var")
        bn_dx = run.layer_matrix("bn_layers", "dx_var")
        blocks = run.layer_matrix("blocks", "grad_var")
        figures = [
            _figure(
                _heatmap(*bn_dy, "dy variance per BatchNorm layer (gradient received)"),
                "dy variance per BatchNorm layer over training (log10)",
                "no BatchNorm dy statistics recorded",
            ),
            _figure(
                _heatmap(*bn_dx, "dx variance per BatchNorm layer (gradient passed on)"),
                "dx variance per BatchNorm layer over training (log10)",
                "no BatchNorm dx statistics recorded",
            ),
            _figure(
                _heatmap(*blocks, "gradient variance at residual block outputs"),
                "gradient variance per residual block over training (log10)",
                "no residual block statistics recorded",
            ),
            _figure(
                _block_curves(*blocks),
                "gradient variance per residual block at the first, middle and last logged steps",
                "no residual block statistics recorded",
            ),
            _figure(_training_curves(run), "training curves", "no loss or accuracy recorded"),
        ]
        if run.noise_records:
            figures.append(
                _figure(
                    _noise_scale(run),
                    "gradient noise scale B_simple over training and against the loss (docs/noise.md)",
                    "no positive noise-scale estimate in any record: the |G|^2 estimate was never "
                    "positive (too few batches per record, or per-sample terms anti-correlated under "
                    "BatchNorm: docs/noise.md)",
                )
            )
    status = "finished" if summary is not None else "in progress (no summary.json)"
    overview = [["status", status], ["records in stats.jsonl", len(run.steps)]]
    if run.steps:
        overview.append(["logged steps", f"{run.steps[0]} .. {run.steps[-1]}"])
    if summary is not None:
        overview += [[key, summary.get(key)] for key in _OVERVIEW_KEYS if key in summary]
    config = (summary or {}).get("config")
    evals = _evaluations(summary)
    parts = [
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n",
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n',
        f"<title>gradstats report: {_cell(run.folder)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        f"<h1>gradstats run report</h1>\n<p>run folder: <code>{_cell(run.folder)}</code></p>\n",
        "".join(f"<p class='note'>{html.escape(note)}</p>\n" for note in run.notes),
        "<h2>Overview</h2>\n",
        _table(["item", "value"], overview),
        "<h2>Alerts</h2>\n",
        _alerts(summary),
        "<h2>Gradient statistics over training</h2>\n",
        *figures,
        "<h2>Per-layer statistics at the last record</h2>\n",
        _last_layers(run.last_record),
        "<h2>Evaluation</h2>\n",
        _table(
            ["step", "epoch", "test loss", "test accuracy"],
            [[e.get("step"), e.get("epoch"), e.get("test_loss"), e.get("test_acc")] for e in evals],
        )
        if evals
        else "<p>no evaluation recorded</p>\n",
        "<h2>Configuration</h2>\n",
        _table(["option", "value"], [[k, v] for k, v in config.items()])
        if isinstance(config, dict)
        else "<p>no configuration recorded (it is written to summary.json at the end of the run)</p>\n",
        "<p>written by gradstats report; self-contained, opens offline</p>\n</body>\n</html>\n",
    ]
    return "".join(parts)


def write_report(run_dir: str, out: str | None = None) -> str:
    """Reads RUN_DIR, writes the report to ``out`` (default RUN_DIR/report.html); returns the path."""
    out = out or os.path.join(run_dir, REPORT_FILE)
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r}: is a folder, expected an HTML file path")
    page = render_html(read_run(run_dir))
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out!r}: folder {folder!r} does not exist")
    # A new file renamed over ``out``: a symlink planted at ``out`` in a shared folder is
    # replaced, never written through.
    replace_in(folder, os.path.basename(out), lambda f: f.write(page))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of gradstats train")
    parser.add_argument(
        "--out", metavar="PATH", help=f"the HTML file to write (default RUN_DIR/{REPORT_FILE})"
    )


def main(args: argparse.Namespace) -> int:
    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0
