"""Defects of torch that the engine works around; each test fails once torch is fixed, so that
the workaround can be reconsidered."""

from __future__ import annotations

import torch
from torch.func import hessian


def _layer_norm_loss(z: torch.Tensor) -> torch.Tensor:
    """A LayerNorm whose input (2, 3) and affine weight (3,) both come from z (9,)."""
    return torch.nn.functional.layer_norm(z[:6].reshape(2, 3), (3,), z[6:]).pow(3).sum()


def test_forward_over_reverse_is_wrong_through_layer_norm():
    z = torch.randn(9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    forward_over_reverse = hessian(_layer_norm_loss)(z)
    leaf = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_layer_norm_loss(leaf), leaf, create_graph=True)
    double_backward = torch.stack([torch.autograd.grad(g[k], leaf, retain_graph=True)[0]
                                   for k in range(9)])
    gap = float((forward_over_reverse - double_backward).norm() / double_backward.norm())
    assert gap > 1e-3, (
        f"torch has fixed the forward-over-reverse defect of layer_norm (pytorch/pytorch#196700): "
        f"torch.func.hessian now agrees with double backward ({gap:.1e}), so forward mode may "
        f"be used again for second derivatives (iif.engine.grads.full_hessian, "
        f"iif.engine.curvature._hessian_chunk_product)")
