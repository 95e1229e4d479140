"""The API reference documents every option and every window column."""
from dataclasses import fields
from pathlib import Path

from moewatch.options import Options
from moewatch.windows import WINDOW_COLUMNS

API = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()


def test_every_option_is_documented():
    missing = [f.name for f in fields(Options) if f"| `{f.name}` |" not in API]
    assert missing == []


def test_every_window_column_is_documented():
    missing = [c for c in WINDOW_COLUMNS if f"`{c}`" not in API]
    assert missing == []
