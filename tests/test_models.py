"""Backbone + head, dropout before every weight layer, MC dropout at test time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lensexp.errors import ConfigError
from lensexp.models import LensRegressor, MCDropout, set_mc_dropout


def weight_layers(m):
    return [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit", "test_efficientnet"])
def test_dropout_before_every_weight_layer(backbone):
    kw = {"img_size": 64} if "vit" in backbone else {}
    m = LensRegressor(backbone, in_chans=2, n_outputs=16, dropout=0.2, dropout_where="all", backbone_kwargs=kw)
    layers = weight_layers(m)
    assert len(layers) == m.n_dropout > 3
    assert all(isinstance(getattr(x, "mc_dropout", None), MCDropout) for x in layers)
    assert all(len(x._forward_pre_hooks) == 1 for x in layers)
    # dropout does not add parameters or state
    plain = LensRegressor(backbone, in_chans=2, n_outputs=16, dropout_where="none", backbone_kwargs=kw)
    assert m.state_dict().keys() == plain.state_dict().keys()
    y = m(torch.randn(3, 2, 64, 64))
    assert y.shape == (3, 16)


def test_head_only_and_none():
    head = LensRegressor("test_resnet", 1, 8, dropout_where="head")
    assert head.n_dropout == 2 and not hasattr(head.backbone.conv1, "mc_dropout")
    none = LensRegressor("test_resnet", 1, 8, dropout_where="none")
    assert none.n_dropout == 0
    with pytest.raises(ConfigError, match="dropout_where"):
        LensRegressor("test_resnet", 1, 8, dropout_where="some")
    with pytest.raises(ConfigError, match="unknown timm backbone"):
        LensRegressor("no_such_net", 1, 8)


def test_mc_dropout_is_stochastic_in_eval_only_when_on():
    m = LensRegressor("test_resnet", 1, 8, dropout=0.3).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        assert set_mc_dropout(m, True) == m.n_dropout
        a, b = m(x), m(x)
        assert not torch.equal(a, b)
        set_mc_dropout(m, False)
        assert torch.equal(m(x), m(x))


def test_small_inputs_are_resized_for_inception():
    m = LensRegressor("inception_v4", 1, 8, dropout=0.1, min_input_size=75)
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 8)
