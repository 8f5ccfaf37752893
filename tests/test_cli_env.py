"""The CLI bounds oneDNN's primitive cache (memory at full size) unless the user chose a size."""

from __future__ import annotations

import os

from globe.cli.main import ONEDNN_CACHE_CAPACITY, main
from globe.fixtures import FIXTURE_DIR

VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def test_cli_sets_a_bounded_onednn_cache(monkeypatch, capsys):
    monkeypatch.delenv(VAR, raising=False)
    assert main(["inspect", str(FIXTURE_DIR)]) == 0
    assert os.environ[VAR] == str(ONEDNN_CACHE_CAPACITY) == "128"


def test_cli_keeps_the_users_onednn_cache_size(monkeypatch, capsys):
    monkeypatch.setenv(VAR, "7")
    assert main(["inspect", str(FIXTURE_DIR)]) == 0
    assert os.environ[VAR] == "7"
