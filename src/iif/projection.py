"""Seeded random projections of per-sample gradients: phi = A^T u with A in R^{M x P}.

A is never stored: it is generated block by block (rows ``lo:hi`` of A) from
``(seed, block index)`` each time it is applied, so memory is ``block_rows * P`` values.
Entries have variance 1/P so that ``E[A A^T] = I`` and inner products are preserved in
expectation. The same seed gives the same A on the same device type; CPU and CUDA
generators draw different (equally valid) matrices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from iif.errors import InputError


@dataclass
class ProjectionSettings:
    """``dim=None`` means no projection (exact features in parameter space)."""

    dim: int | None = None
    kind: Literal["gaussian", "rademacher"] = "gaussian"
    seed: int = 0
    block_elements: int = 1 << 22  # values of A generated at once (16 MiB in float32)

    def __post_init__(self) -> None:
        dim = self.dim
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer))
                                or dim < 1):
            raise InputError(f"projection dim must be an integer >= 1 or None, got {dim!r}")
        if self.kind not in ("gaussian", "rademacher"):
            raise InputError(
                f"projection kind must be 'gaussian' or 'rademacher', got {self.kind!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Projector(Protocol):
    dim: int

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(n, M) -> (n, P)."""
        ...


class IdentityProjector:
    """No projection: features are the gradients themselves (P = M)."""

    def __init__(self, num_params: int):
        self.dim = num_params

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads


class RandomProjector:
    """Dense Gaussian or Rademacher projection generated in row blocks from a seed."""

    def __init__(
        self,
        num_params: int,
        settings: ProjectionSettings,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if settings.dim is None:
            raise InputError("RandomProjector needs a projection dim")
        self.num_params = num_params
        self.dim = int(settings.dim)
        self.settings = settings
        self.device = torch.device(device)
        self.dtype = dtype
        rows = max(1, settings.block_elements // self.dim)
        self.blocks = [(lo, min(lo + rows, num_params)) for lo in range(0, num_params, rows)]

    def block(self, index: int) -> torch.Tensor:
        """Rows ``blocks[index]`` of A, shape (hi - lo, P), regenerated from the seed."""
        lo, hi = self.blocks[index]
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.settings.seed * 1_000_003 + index) % (2**63 - 1))
        shape = (hi - lo, self.dim)
        scale = self.dim ** -0.5
        if self.settings.kind == "gaussian":
            a = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
        else:
            a = torch.randint(0, 2, shape, generator=gen, device=self.device).to(self.dtype)
            a = a.mul_(2).sub_(1)
        return a.mul_(scale)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.num_params:
            raise InputError(
                f"cannot project vectors of size {grads.shape[-1]} with a projector for "
                f"{self.num_params} parameters"
            )
        out = torch.zeros(*grads.shape[:-1], self.dim, device=grads.device, dtype=grads.dtype)
        for index, (lo, hi) in enumerate(self.blocks):
            out += grads[..., lo:hi] @ self.block(index).to(grads.dtype)
        return out


def make_projector(
    num_params: int,
    settings: ProjectionSettings,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Projector:
    if settings.dim is None:
        return IdentityProjector(num_params)
    return RandomProjector(num_params, settings, device=device, dtype=dtype)
