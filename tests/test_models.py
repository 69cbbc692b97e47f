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


class PoolHead(torch.nn.Module):
    """A network from outside lensexp: global pooling and one linear layer (the test of 'a new
    head is a class plus a YAML file')."""

    def __init__(self, in_chans: int, n_outputs: int, width: int = 4):
        super().__init__()
        self.proj = torch.nn.Conv2d(in_chans, width, 3, padding=1)
        self.out = torch.nn.Linear(width, n_outputs)

    def forward(self, x):
        return self.out(self.proj(x).mean((-2, -1)))


def test_a_new_network_is_a_class_and_a_target(tmp_path):
    """``model._target_`` picks any network class for training; loading the checkpoint of one
    that lives outside lensexp is refused (checkpoints may only name lensexp classes)."""
    from lensexp.checkpoints import load_module
    from lensexp.config import compose_config
    from lensexp.train import run

    over = [
        "data.source.kind=sersic",
        "datamodule.source=on_the_fly",
        "datamodule.train_epoch_size=16",
        "datamodule.val_size=8",
        "datamodule.batch_size=8",
        "trainer.max_epochs=1",
        "logger=csv",
        "n_mc_val=1",
    ]
    cfg = compose_config("train", over)
    cfg.model = {"_target_": "tests.test_models.PoolHead", "width": 6}  # what conf/model/pool_head.yaml would hold
    run(cfg, tmp_path)
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["hyper_parameters"]["spec"]["model"] == {"_target_": "tests.test_models.PoolHead", "width": 6}
    assert ck["state_dict"]["net.proj.weight"].shape == (6, 1, 3, 3)
    with pytest.raises(ConfigError, match="refused network class 'tests.test_models.PoolHead'"):
        load_module(tmp_path / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("kind", ["regressor", "kappa"])
def test_channels_last_layout_gives_the_same_network(kind):
    """channels_last (the default) only changes the memory layout: the same weights give the same
    outputs and gradients as the NCHW network to float rounding, and state dicts load across."""
    from lensexp.kappa_net import KappaUNet

    def make(cl):
        torch.manual_seed(0)
        if kind == "kappa":
            return KappaUNet("test_resnet", in_chans=1, dropout_where="none", channels_last=cl)
        return LensRegressor("test_resnet", 1, 8, dropout_where="none", channels_last=cl)

    cl, cf = make(True), make(False)
    convs = [m.weight for m in cl.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in cf.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
    )
    cf.load_state_dict(cl.state_dict())
    x = torch.randn(4, 1, 64, 64)
    a, b = cl.train()(x), cf.train()(x)
    assert a.is_contiguous() and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(cl.named_parameters(), cf.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["regressor", "kappa"])
def test_outputs_stay_float32_under_bf16_mixed_precision(kind):
    """Under bf16 autocast (``trainer.precision=bf16-mixed``) the backbone runs in bfloat16 but
    the outputs a loss reads come from float32 layers: float32 dtype, and within bfloat16's
    rounding of the float32 network (not bfloat16's 3 digits on the outputs themselves)."""
    from lensexp.kappa_net import KappaUNet

    torch.manual_seed(0)
    if kind == "kappa":
        net = KappaUNet("test_resnet", in_chans=1, dropout_where="none")
    else:
        net = LensRegressor("test_resnet", 1, 8, dropout_where="none")
    x = torch.randn(4, 1, 64, 64)
    ref = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        feats = net.backbone(x) if kind == "regressor" else net.encoder(x)[-1]
    assert feats.dtype == torch.bfloat16  # the autocast region is live
    assert out.dtype == torch.float32 and ref.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_losses_are_float32_under_bf16_mixed_precision():
    """``models.float32`` runs the loss with autocast off: a Gaussian NLL and a flow NLL read
    float32 inputs and give float32 values inside a bf16 autocast region."""
    from lensexp.losses import GaussianNLL
    from lensexp.models import float32

    out, y = torch.randn(16, 16), torch.randn(16, 8)
    linear = nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(out).dtype == torch.bfloat16
        assert float32(linear, out).dtype == torch.float32
        loss = float32(GaussianNLL(), out.bfloat16(), y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, GaussianNLL()(out.bfloat16().float(), y))


def test_cpu_dropout_16bit_masks_rate_scale_gradient_and_seed():
    """The CPU dropout above SPARSE_MAX (16-bit uniforms from torch's generator): drop rate p to
    binomial precision, kept elements scaled by 1/(1-k/65536) (unbiased mean), the gradient is
    the same mask times the scale, channels-last inputs keep their layout, and the masks repeat
    by seed."""
    from lensexp.models import SPARSE_MAX, MCDropout

    p = 0.25
    assert p > SPARSE_MAX
    drop = MCDropout(p).train()
    x = torch.ones(32, 16, 32, 32, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / y.numel()) ** 0.5
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 65536 / (65536 - round(p * 65536))))
    assert abs(y.mean().item() - 1.0) < 0.005
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(sum y)/dx = mask * scale = y for x = 1
    torch.manual_seed(3)
    torch.testing.assert_close(drop(x), y)  # same seed, same mask
    xc = torch.randn(8, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    yc = drop(xc)
    assert yc.is_contiguous(memory_format=torch.channels_last)
    ratio = yc[yc != 0] / xc[yc != 0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 65536 / (65536 - 16384)))
    # the lanes of each 64-bit draw are independent uniforms: each drops at rate p
    z = drop(torch.ones(400_000))
    lanes = (z == 0).float().view(-1, 4).mean(0)
    assert (lanes - p).abs().max() < 4 * (p * (1 - p) / 100_000) ** 0.5
    assert torch.equal(MCDropout(0.1).eval()(xc), xc)  # off in eval mode unless mc
    assert torch.isfinite(MCDropout(0.999999).train()(xc)).all()  # rounds to 65535 of 65536 codes, not all


@pytest.mark.parametrize("p", [0.02, 0.2])
def test_sparse_cpu_dropout_is_bernoulli_unbiased_and_repeats_by_seed(p):
    """At rates up to SPARSE_MAX the CPU dropout draws the dropped positions: the rate is p to
    binomial precision, whether an element drops does not depend on its neighbour (lag-1 and
    lag-2 drop rates p) nor on its place (each quarter of the tensor at rate p), kept elements
    are scaled by exactly 1/(1-p) and the gradient is the same mask times that scale."""
    from lensexp.models import SPARSE_MAX, MCDropout

    assert p <= SPARSE_MAX
    n = 2_000_000
    tol = lambda m: 5 * (p * (1 - p) / m) ** 0.5  # noqa: E731
    torch.manual_seed(11)
    x = torch.ones(n, requires_grad=True)
    y = MCDropout(p).train()(x)
    d = y == 0
    assert abs(d.float().mean().item() - p) < tol(n)
    for lag in (1, 2):  # P(drop at i + lag | drop at i) = p: no clustering, no spacing
        both = (d[:-lag] & d[lag:]).sum().item() / d[:-lag].sum().item()
        assert abs(both - p) < tol(d.sum().item())
    quarters = d.view(4, -1).float().mean(1)
    assert (quarters - p).abs().max() < tol(n // 4)
    kept = y[~d]
    assert torch.equal(kept, torch.full_like(kept, 1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(11)
    assert torch.equal(MCDropout(p).train()(x.detach()), y.detach())  # same seed, same mask


def test_sparse_cpu_dropout_keeps_the_layout_and_masks_the_gradient_where_it_dropped():
    """A channels-last input stays channels-last; forward and backward zero the same logical
    elements whatever layout the incoming gradient has; bfloat16 works; an empty tensor too."""
    from lensexp.models import MCDropout

    drop = MCDropout(0.1).train()
    torch.manual_seed(5)
    x = (torch.rand(4, 8, 10, 10) + 0.5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = drop(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.rand(4, 8, 10, 10) + 0.5  # NCHW gradient into a channels-last output
    y.backward(g)
    assert torch.equal(x.grad == 0, y == 0)
    torch.testing.assert_close(x.grad[y != 0], g[y != 0] / 0.9)
    torch.testing.assert_close(y[y != 0], x.detach()[y != 0] / 0.9)
    yb = drop(torch.ones(64, 16, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last))
    assert yb.dtype == torch.bfloat16 and 0 < (yb == 0).float().mean().item() < 0.2
    assert drop(torch.ones(0, 3)).shape == (0, 3)


def test_drop_positions_draws_more_gaps_when_the_first_draw_falls_short(monkeypatch):
    """The rare call whose first gaps end before the tensor does draws more until they cover it:
    forced here by a first draw of one gap, the positions are still sorted, distinct, inside
    the tensor and at rate p."""
    from lensexp import models

    real = models._gaps_to_draw
    monkeypatch.setattr(models, "_gaps_to_draw", lambda mean, more: real(mean, more) if more else 1)
    torch.manual_seed(2)
    pos = models.drop_positions(200_000, 0.05)
    assert bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < 200_000
    assert abs(len(pos) / 200_000 - 0.05) < 5 * (0.05 * 0.95 / 200_000) ** 0.5
    assert len(models.drop_positions(1000, 1e-300)) == 0  # gaps beyond int64 stay past the end


def test_train_throughput_compare_switches_the_dropout_and_restores_it():
    """``benchmarks/train_throughput.py --compare``: the baseline really runs ``F.dropout``
    (scale exactly 1/(1-p) in float32), the ``bits`` route the 16-bit masks (scale
    65536/(65536-k)), the CPU dropout is back afterwards, and each variant is reported with its
    ratio to the baseline."""
    import sys

    from lensexp import models
    from lensexp.paths import PROJECT_ROOT

    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    import train_throughput as tt

    chosen = models._cpu_dropout
    x = torch.ones(20_000)
    with tt.dropout_route("torch"):
        kept = models.MCDropout(0.1).train()(x)
        kept = kept[kept != 0]
        assert torch.equal(kept, torch.full_like(kept, 1 / 0.9))
    with tt.dropout_route("bits"):
        kept = models.MCDropout(0.02).train()(x)
        kept = kept[kept != 0]
        assert torch.equal(kept, torch.full_like(kept, 65536 / (65536 - round(0.02 * 65536))))
    assert models._cpu_dropout is chosen
    args = ["--compare", "--models", "tiny", "--sizes", "tiny", "--batch", "4", "--steps", "1", "--dropout", "0.02"]
    rows = tt.main(args)
    assert [r["variant"] for r in rows] == list(tt.VARIANTS) and rows[0]["ratio"] == 1.0
    assert all(r["img_s"] > 0 and r["dropout"] == 0.02 for r in rows)
