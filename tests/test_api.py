"""The public API: every exported name exists and the README's API section documents it."""

import pathlib

import gradstats

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_exports_exist():
    missing = [name for name in gradstats.__all__ if not hasattr(gradstats, name)]
    assert not missing, f"gradstats.__all__ names that do not exist: {missing}"


def test_readme_documents_every_export():
    text = README.read_text(encoding="utf-8")
    api = text[text.index("## API"):]
    undocumented = [name for name in gradstats.__all__ if f"`{name}" not in api and f"{name}(" not in api
                    and f"`{name}`" not in api]
    assert not undocumented, f"exported but not in the README's API section: {undocumented}"
