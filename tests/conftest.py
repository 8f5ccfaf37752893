"""Shared fixtures: tiny saved models of every registry architecture, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{model_type: (model, saved_dir)} for every registry entry."""
    from globe.testing.models import TINY, save_model, tiny_model

    out = {}
    root = tmp_path_factory.mktemp("tiny")
    for mt in TINY:
        m = tiny_model(mt)
        out[mt] = (m, save_model(m, root / mt))
    return out


@pytest.fixture(scope="session")
def random_export(tmp_path_factory):
    """(globe export in fp32, its fit directory) of the bundled fixture with random artifacts, built once.
    Read-only for tests: a test that damages one copies it first (cli_helpers.edit_*)."""
    import globe
    from globe import compat
    from globe.config import ExportCfg
    from globe.fixtures import FIXTURE_DIR
    from globe.testing.artifacts import random_artifacts

    tmp = tmp_path_factory.mktemp("random_export")
    random_artifacts(compat.load_pretrained(FIXTURE_DIR, torch.float32)).save(tmp / "fit")
    return globe.export(FIXTURE_DIR, tmp / "fit", tmp / "globe", ExportCfg(dtype="fp32")), tmp / "fit"
