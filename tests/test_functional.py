"""``unit_normalize``: F.normalize's value and gradient, without its slow CPU reduction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtunlearn_ext._functional import unit_normalize


@pytest.mark.parametrize("shape,dim", [((4, 3, 5, 7), 1), ((6, 3), 1), ((3, 8), 0), ((2, 3, 1, 1), 1),
                                       ((0, 3, 4, 4), 1)])
@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-1])
def test_matches_f_normalize_value_and_gradient(shape: tuple[int, ...], dim: int,
                                                eps: float) -> None:
    g = torch.Generator().manual_seed(sum(shape) + dim)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if x.numel():
        x.select(dim, 0).mul_(0.01)
        x.flatten()[:shape[-1]] = 0.0  # a zero vector or two: below every eps
    upstream = torch.randn(*shape, generator=g, dtype=torch.float64)
    ours = x.clone().requires_grad_(True)
    ref = x.clone().requires_grad_(True)
    out = unit_normalize(ours, dim=dim, eps=eps)
    expected = F.normalize(ref, dim=dim, eps=eps)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert ours.grad is not None and ref.grad is not None
    assert torch.isfinite(ours.grad).all()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_rows_have_unit_norm(dtype: torch.dtype) -> None:
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    norms = unit_normalize(x).double().pow(2).sum(1).sqrt()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_vectors_of_any_scale_normalise(dtype: torch.dtype) -> None:
    """In fp16 the square overflowed above ~150 (a zero vector came out), underflowed below
    ~2e-4 (a wrong direction), and eps**2 rounded to 0 (a zero vector gave NaN)."""
    direction = torch.tensor([1.0, 2.0, 2.0]) / 3.0
    for scale in (1e-4, 1.0, 200.0, 3e4):
        x = (direction * scale).to(dtype).reshape(1, 3, 1, 1)
        expected = F.normalize(x.float(), dim=1).to(dtype)
        torch.testing.assert_close(unit_normalize(x), expected, rtol=1e-2, atol=1e-2)
    zero = torch.zeros(1, 3, 1, 1, dtype=dtype)
    assert torch.equal(unit_normalize(zero), zero)
