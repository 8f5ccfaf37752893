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
