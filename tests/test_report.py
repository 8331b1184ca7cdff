"""`gradstats report`: the HTML page of a real (tiny) training run, of a run still in progress,
of a run folder crafted to inject script (layer names, configuration, alerts, an attribute
breaker, mathtext), the paths it writes, and clear errors for missing or corrupt files."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from html.parser import HTMLParser

import pytest
import torch
from conftest import cli_error, read_records, train_quietly

from gradstats.tools.cli import main as cli_main
from gradstats.tools.report import layer_matrix, read_run, render_html, write_report

PNG = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE_BREAKER = "\"'><img src=x onerror=alert(2)>"
MATHTEXT = "$x^{$ \\frac"  # invalid mathtext: must be drawn as written, not parsed

# Everything the page may contain: these tags, these attributes, images only as data URIs.
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code",
    "table", "tr", "th", "td", "figure", "img", "figcaption",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {"lang", "charset", "http-equiv", "content", "class", "src", "alt"}


class _Page(HTMLParser):
    """Tags, attributes and text of a page as a browser's tokenizer sees them."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.attributes, self.images, self.text = [], [], [], []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [name for name, _ in attrs]
        self.images += [value for name, value in attrs if tag == "img" and name == "src"]

    def handle_data(self, data):
        self.text.append(data)


def _check_self_contained(page: str) -> _Page:
    parsed = _Page(page)
    assert set(parsed.tags) <= ALLOWED_TAGS, set(parsed.tags) - ALLOWED_TAGS
    assert set(parsed.attributes) <= ALLOWED_ATTRIBUTES, set(parsed.attributes) - ALLOWED_ATTRIBUTES
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "url(" not in lowered
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    assert all(m.group(1) == "data:image/png;base64," for m in re.finditer(r'src="(.{22})', page))
    # every "src=" is an image's data URI or shown text (a hostile name, escaped)
    assert page.count("src=") == len(parsed.images) + "".join(parsed.text).count("src=")
    for uri in parsed.images:
        assert base64.b64decode(uri.removeprefix("data:image/png;base64,"), validate=True).startswith(PNG)
    return parsed


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real `gradstats train` run: CIFAR ResNet-8 on 24 tiny images, 6 steps, a record per 2."""
    from PIL import Image

    images = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (images / label).mkdir()
        for i in range(12):
            Image.fromarray(torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()).save(
                images / label / f"{i}.png"
            )
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_quietly(
            out=str(out),
            data=str(images),
            depth=8,
            batch_size=8,
            steps=6,
            log_every=2,
        )
    finally:
        torch.set_num_threads(threads)
    return out


def test_report_of_a_real_run(run_dir, tmp_path):
    out = tmp_path / "report.html"
    assert cli_main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    parsed = _check_self_contained(page)
    assert len(parsed.images) == 5  # dy heat map, dx heat map, block heat map, block curves, training
    text = "".join(parsed.text)
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in summary["bn_layers"] + summary["blocks"]:
        assert f"<td>{name}</td>" in page
    assert "finished" in text and "no alerts recorded" in text and "lr" in text
    records = read_records(run_dir)
    run = read_run(str(run_dir))
    for group, key in (("bn_layers", "dy_var"), ("bn_layers", "dx_var"), ("blocks", "grad_var")):
        names, steps, values = run.layer_matrix(group, key)
        assert names == summary[group] and steps == [2, 4, 6]
        assert values.tolist() == [[r[group][i][key] for r in records] for i in range(len(names))]


def test_layer_matrix_aligns_layers_by_name():
    records = [
        {"step": 1, "blocks": [{"name": "a", "grad_var": 1.0}, {"name": "b", "grad_var": 2.0}]},
        {"step": 2, "blocks": [{"name": "b", "grad_var": 3.0}, {"name": "c", "grad_var": None}]},
        {"step": 3, "blocks": "not a list"},
        {"step": 4, "blocks": [{"name": "a", "grad_var": "1e9"}, {"name": "c", "grad_var": 5.0}, {"x": 1}]},
    ]
    names, steps, values = layer_matrix(records, "blocks", "grad_var")
    nan = float("nan")
    assert names == ["a", "b", "c"] and steps == [1, 2, 3, 4]
    expected = [[1.0, nan, nan, nan], [2.0, 3.0, nan, nan], [nan, nan, nan, 5.0]]
    assert values.shape == (3, 4)
    for row, want in zip(values.tolist(), expected):
        assert [str(v) for v in row] == [str(v) for v in want]


def test_default_out_is_in_the_run_folder_and_in_progress_runs_are_reported(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "summary.json").unlink()
    with open(run / "stats.jsonl", "a") as f:
        f.write('{"step": 8, "bn_lay')  # a record being written
    assert write_report(str(run)) == str(run / "report.html")
    parsed = _check_self_contained((run / "report.html").read_text())
    text = "".join(parsed.text)
    assert "in progress" in text and "incomplete" in text and "no alerts recorded" in text
    assert len(parsed.images) == 5


def _hostile_run(folder, names):
    """A run folder whose every string is an attack: layer and block names, configuration,
    data description, alerts, evaluation, and plot file names that point outside."""
    folder.mkdir()
    records = []
    for step in (10, 20, 30):
        records.append(
            {
                "step": step,
                "train_loss": 1.0 / step,
                "train_acc": 0.5,
                "bn_layers": [
                    {
                        "name": n,
                        "channels": 4,
                        "dy_var": 1e-3 * (i + 1) * step,
                        "dx_var": 2e-3,
                        "dy_nonfinite": 0,
                    }
                    for i, n in enumerate(names)
                ],
                "blocks": [
                    {"name": n, "channels": 4, "grad_var": 1e-4 * (i + 1)} for i, n in enumerate(names)
                ],
            }
        )
    (folder / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "config": {"out": SCRIPT, "data": ATTRIBUTE_BREAKER, SCRIPT: [SCRIPT]},
        "data": SCRIPT,
        "device": ATTRIBUTE_BREAKER,
        "steps": 30,
        "bn_layers": names,
        "eval": [{"step": 30, "epoch": SCRIPT, "test_loss": 1.0, "test_acc": 0.5}],
        "plots": ["../../outside.png", "/tmp/gradstats-report-test-outside.png"],
        "alerts": [
            {"kind": SCRIPT, "layer": ATTRIBUTE_BREAKER, "step": 20, "message": SCRIPT + MATHTEXT},
            SCRIPT,
        ],
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_run_folder_strings_reach_the_page_only_escaped(tmp_path):
    names = [SCRIPT, ATTRIBUTE_BREAKER, MATHTEXT, "../../etc/passwd", "x" * 300]
    run = tmp_path / "run"
    _hostile_run(run, names)
    page = render_html(read_run(str(run)))
    parsed = _check_self_contained(page)
    assert parsed.tags.count("img") == len(parsed.images) == 5  # the breaker made no <img>
    text = "".join(parsed.text)
    for hostile in (SCRIPT, ATTRIBUTE_BREAKER, MATHTEXT):  # shown, as text
        assert hostile in text
        assert html.escape(hostile, quote=True) in page
    assert SCRIPT not in page and ATTRIBUTE_BREAKER not in page
    assert "kind" in page and "<td>20</td>" in page  # the alert table


def test_report_writes_only_its_out_file(tmp_path):
    run = tmp_path / "run"
    _hostile_run(run, [SCRIPT, "../../escaped", "/tmp/absolute", "a/b"])
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / "report.html").symlink_to(victim)  # planted in the shared folder
    before = {p for p in tmp_path.rglob("*")}
    assert cli_main(["report", str(run)]) == 0
    after = {p for p in tmp_path.rglob("*")}
    assert after == before  # report.html replaced the link in place; nothing else appeared
    assert victim.read_text() == "precious"
    assert not (run / "report.html").is_symlink() and "<html" in (run / "report.html").read_text()


def test_alerts_are_listed(tmp_path):
    run = tmp_path / "run"
    _hostile_run(run, ["bn1"])
    summary = json.loads((run / "summary.json").read_text())
    summary["alerts"] = [
        {"kind": "vanishing", "layer": "layer3.1.bn2", "step": 7, "message": "dy var fell 1e6x"}
    ]
    (run / "summary.json").write_text(json.dumps(summary))
    page = render_html(read_run(str(run)))
    assert "<td>7</td><td>vanishing</td><td>layer3.1.bn2</td><td>dy var fell 1e6x</td>" in page
    assert "no alerts recorded" not in page


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda run: None, "not a folder"),
        (lambda run: run.mkdir(), "stats.jsonl: no such file"),
        (
            lambda run: (run.mkdir(), (run / "stats.jsonl").write_text('{"step": 1}\n{oops\n{"step": 3}\n')),
            "stats.jsonl, line 2: not a JSON record",
        ),
        (
            lambda run: (run.mkdir(), (run / "stats.jsonl").write_text('["a list"]\n')),
            "stats.jsonl, line 1: expected a JSON object",
        ),
        (
            lambda run: (
                run.mkdir(),
                (run / "stats.jsonl").write_text('{"step": 1}\n'),
                (run / "summary.json").write_text("{truncated"),
            ),
            "summary.json: not JSON",
        ),
        (
            lambda run: (
                run.mkdir(),
                (run / "stats.jsonl").write_text('{"step": 1}\n'),
                (run / "summary.json").write_text('{"alerts": "x"}'),
            ),
            "summary.json: 'alerts' must be a list",
        ),
    ],
)
def test_missing_or_corrupt_files_are_named(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    setup(run)
    err = cli_error(["report", run], capsys)
    assert message in err and "Traceback" not in err
    assert not (run / "report.html").exists()


@pytest.mark.parametrize(
    "records, summary",
    [
        ([{"step": 1, "bn_layers": 5, "blocks": [1, "x", None, {"name": 3}], "train_loss": "x"}], None),
        ([{"step": 1, "blocks": [{"name": "a", "grad_var": 10**400}], "train_acc": 10**400}], None),
        (
            [{"step": 2, "bn_layers": [{"name": "b", "dy_var": -1.0, "dx_var": 0.0}]}],
            {"eval": 5, "config": "x"},
        ),
        ([], {"eval": [{"step": 10**400}, "x", {"step": None}], "config": [1], "alerts": [None, 3, {}]}),
        ([{"step": 1.5}], {"steps": {"nested": [SCRIPT]}, "data": None, "alerts": []}),
    ],
)
def test_odd_values_in_a_run_folder_give_a_page(tmp_path, records, summary):
    """Wrong types anywhere (a folder not written by gradstats train, or edited) give a page
    built from what makes sense, not a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    page = render_html(read_run(str(run)))
    _check_self_contained(page)
    assert SCRIPT not in page


def test_a_step_that_is_not_a_number_is_named(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "stats.jsonl").write_text(json.dumps({"step": 10**400}) + "\n")
    assert "stats.jsonl, line 1: expected a JSON object with a numeric 'step'" in cli_error(
        ["report", run], capsys
    )
