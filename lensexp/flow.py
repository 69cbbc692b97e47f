"""A normalizing-flow posterior head: neural posterior estimation over all labels at once.

The network's head gives a context vector ``c`` per image; a conditional flow from zuko
(Rozet et al.; neural spline flow of Durkan et al. 2019, ``flow: nsf``, or masked autoregressive
flow of Papamakarios et al. 2017, ``flow: maf``) maps standardised labels ``z`` to a standard
normal ``u = T(z; c)``, so that ``log q(z | c) = log N(T(z; c); 0, I) + log |det dT/dz|``.
Training minimises ``-log q(z_true | c)`` (the NPE loss, Papamakarios & Murray 2016; Legin et al.
2023 for lenses); posterior samples are ``T^-1(u; c)`` with ``u ~ N(0, I)`` drawn from a given
generator (deterministic by seed). Unlike the Gaussian heads, the posterior may be skewed,
multimodal and correlated between labels.
"""

from __future__ import annotations

import torch
from torch import nn

from lensexp.errors import ConfigError

FLOWS = ("nsf", "maf")


class FlowNLL(nn.Module):
    """Conditional flow over ``n_labels`` standardised labels; network outputs are its ``context``
    vector. ``transforms``: autoregressive layers; ``hidden``: widths of each layer's MLP;
    ``bins``: spline bins (``nsf`` only); ``passes``: sequential passes to invert each layer
    (2: coupling-like, sampling ~4x faster than fully autoregressive ``passes = d``)."""

    name = "flow_nll"

    def __init__(
        self,
        n_labels: int = 8,
        flow: str = "nsf",
        transforms: int = 3,
        hidden=(128, 128),
        context: int = 64,
        bins: int = 8,
        passes: int = 2,
    ):
        super().__init__()
        import zuko

        d = int(n_labels)
        if flow not in FLOWS:
            raise ConfigError(f"loss.flow must be one of {FLOWS}, got '{flow}'")
        if int(transforms) < 1 or int(context) < 1 or int(bins) < 2 or not hidden or not 1 <= int(passes) <= d:
            raise ConfigError(
                f"flow settings need transforms >= 1, context >= 1, bins >= 2, hidden layers and 1 <= passes <= {d}; "
                f"got transforms={transforms}, context={context}, bins={bins}, hidden={hidden}, passes={passes}"
            )
        self.d, self.context = int(d), int(context)
        kw = dict(
            features=self.d,
            context=self.context,
            transforms=int(transforms),
            hidden_features=[int(h) for h in hidden],
            passes=int(passes),
        )
        self.flow = zuko.flows.NSF(bins=int(bins), **kw) if flow == "nsf" else zuko.flows.MAF(**kw)

    def n_outputs(self, d: int) -> int:
        if d != self.d:
            raise ConfigError(f"the flow was built for {self.d} labels, the network has {d}")
        return self.context

    def log_prob(self, out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``log q(z | context)`` [B] of standardised labels ``z`` [B, D] (nats, network units)."""
        return self.flow(out).log_prob(z)

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(out, y).mean()

    def sample(
        self, out: torch.Tensor, n: int, generator: torch.Generator | None = None, common: bool = False
    ) -> torch.Tensor:
        """``n`` posterior samples [n, B, D] (network units) per context in ``out`` [B, C];
        ``common``: the same base draws for every context (see :func:`metrics.mixture_samples`)."""
        b = out.shape[0]
        u = (
            torch.randn((n, 1 if common else b, self.d), generator=generator, dtype=out.dtype)
            .expand(n, b, self.d)
            .contiguous()
        )
        return self.flow(out).transform.inv(u.to(out.device))
