"""Every registered sparse map and activation (globe.maps) keeps the contracts the fit, the temperature
controller and the runtime rely on: codes on the simplex in fp32, invariant to a shift of the logits
(the fit centres them), support growing with T unless the map is dense; in-place phi bit-equal to
phi, phi' equal to autograd's; unknown names refused by the config."""

from __future__ import annotations

import pytest
import torch

from globe.config import BankCfg, SparsityCfg
from globe.errors import GlobeError
from globe.maps import ACTIVATIONS, SPARSE_MAPS, get_activation, get_sparse_map, sparse_map, support


@pytest.mark.parametrize("name", sorted(SPARSE_MAPS))
def test_sparse_map_contract(name):
    z = torch.randn(50, 12, generator=torch.Generator().manual_seed(0))
    a = sparse_map(z.half(), 0.5, name)
    assert a.dtype == torch.float32 and (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(50))
    torch.testing.assert_close(sparse_map(z + 3.0, 0.5, name), sparse_map(z, 0.5, name))  # shift invariant
    sup = [float(support(sparse_map(z, T, name)).float().median()) for T in (0.02, 1.0, 50.0)]
    if get_sparse_map(name).dense:
        assert sup[1:] == [12.0, 12.0]  # (at T = 0.02 softmax underflows in fp32)
    else:
        assert sup[0] < sup[2] and sup[0] <= 2  # temperature control has something to steer
    assert SparsityCfg(map=name).map == name


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_contract(name):
    act = get_activation(name)
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(1)) * 3
    y = act.fn(x)
    buf = x.clone()
    act.fn_(buf)
    assert torch.equal(buf, y)  # the runtime's in-place phi gives the fit's bits
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(act.fn(xg).sum(), xg)
    torch.testing.assert_close(act.grad(x), g)
    assert BankCfg(activation=name).activation == name


def test_unknown_names_refused():
    with pytest.raises(GlobeError, match="unknown sparse map 'topk'"):
        sparse_map(torch.zeros(2, 3), 1.0, "topk")
    with pytest.raises(GlobeError, match="unknown activation 'relu'"):
        get_activation("relu")
    with pytest.raises(ValueError, match="sparsity.map"):
        SparsityCfg(map="topk")
