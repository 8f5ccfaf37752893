"""Model-free layer reads give exactly the tensors transformers holds in memory, for every architecture."""

from __future__ import annotations

import pytest
import torch

from globe import compat
from globe.io.checkpoint import Checkpoint
from globe.testing.models import TINY


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_layer_state_equals_model_state(tiny_dirs, model_type):
    model, path = tiny_dirs[model_type]
    ck = Checkpoint(path)
    sd = model.state_dict()
    for L in range(model.config.num_hidden_layers):
        st = compat.layer_state(ck, L)
        want = {k for k in sd if k.startswith(f"{ck.spec.layers_prefix}.{L}.")}
        assert set(st) == want
        for k, v in st.items():
            assert torch.equal(v, sd[k]), k
