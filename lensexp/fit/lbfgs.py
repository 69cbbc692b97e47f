"""The fit's L-BFGS runs: one set of settings for the light finish, the polish and the shapelet stage."""

from __future__ import annotations

import torch


def minimise(params: list[torch.Tensor], loss_fn, max_iter: int, tolerance_grad: float = 1e-10) -> tuple[int, int]:
    """L-BFGS (strong Wolfe line search, history 20) of ``loss_fn()`` over ``params`` in place,
    at most ``max_iter`` iterations, stopping when the loss changes by < 1e-9 (``-ln L`` units:
    far below any meaningful change); a non-finite loss reads as 1e300 (the line search backs
    off) and NaN gradients as 0. Returns (iterations, loss evaluations)."""
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=tolerance_grad,
        tolerance_change=1e-9,
    )

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        if not torch.isfinite(loss):
            return torch.tensor(1e300, dtype=loss.dtype, device=loss.device)
        loss.backward()
        for t in params:
            t.grad.nan_to_num_(0.0, 0.0, 0.0)
        return loss

    opt.step(closure)
    state = opt.state[params[0]]
    return int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
