"""Random torch tensors of any dtype, for the readers' tests (seeded: the same bits each run)."""

from __future__ import annotations

import torch


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A seeded random tensor: booleans, floats and complex around 0 (scale 3), integers in
    [0, 100) so that every integer dtype holds them."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)
