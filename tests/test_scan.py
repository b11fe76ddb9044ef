"""The PyTorch scan: quadratic reference == chunked == recurrent steps, in float64; and why
the segment sums are computed the stable way."""
import pytest
import torch

from scan_kernel import (segsum, segsum_naive, ssd, ssd_chunked, ssd_quadratic, ssd_recurrent,
                         ssd_step)

Q = 8  # a small chunk so that several chunks and remainders stay cheap


def inputs(b=2, l=11, h=3, p=4, n=5, strong_decay=False, init=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    A = -torch.rand(h, generator=g, dtype=dtype) * (40.0 if strong_decay else 2.0) - 0.05
    dt = r(b, l, h) + (3.0 if strong_decay else 0.0)
    return dict(x=r(b, l, h, p), dt=dt, A=A, B=r(b, l, h, n), C=r(b, l, h, n), dt_bias=r(h),
                initial_state=r(b, h, p, n) if init else None)


@pytest.mark.parametrize("l", [1, Q - 1, Q, Q + 1, 3 * Q + 5])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("strong_decay", [False, True])
def test_three_forms_agree(l, init, strong_decay):
    kw = inputs(l=l, init=init, strong_decay=strong_decay, seed=l)
    y_ref, s_ref = ssd_quadratic(**kw)
    y_rec, s_rec = ssd_recurrent(**kw)
    y_chk, s_chk = ssd(**kw, chunk_size=Q, backend="torch")
    for y, s in [(y_rec, s_rec), (y_chk, s_chk)]:
        assert torch.isfinite(y).all() and torch.isfinite(s).all()
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
    assert y_ref.abs().max() > 1e-3  # the check is not on (near) zeros


def test_long_strong_decay_stays_finite_in_float32():
    kw = inputs(l=300, strong_decay=True, dtype=torch.float32)
    kw["dt"] = kw["dt"] + 30.0  # exp(dt*A) underflows to 0: no inf, no NaN
    y, s = ssd(**kw, chunk_size=64, backend="torch")
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


def test_chunked_gradients_match_reference():
    kw = inputs(l=2 * Q + 3, seed=7)
    leaves = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
    w = torch.randn(2, 2 * Q + 3, 3, 4, dtype=torch.float64)
    grads = []
    for fn in (ssd_quadratic, lambda **k: ssd_chunked(**k, chunk_size=Q)):
        y, s = fn(**leaves)
        loss = (y * w).sum() + s.pow(2).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for name, g_ref, g in zip(leaves, *grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_step_inplace_and_shapes():
    kw = inputs(l=1, seed=3)
    state = kw["initial_state"].clone()
    args = (kw["x"][:, 0], kw["dt"][:, 0], kw["A"], kw["B"][:, 0], kw["C"][:, 0], kw["dt_bias"])
    y, new = ssd_step(state.clone(), *args)
    y2, same = ssd_step(state, *args, inplace=True)
    assert same is state
    torch.testing.assert_close(state, new)
    torch.testing.assert_close(y2, y)


def test_bad_shapes_are_a_clear_error():
    kw = inputs(l=4)
    kw["B"] = kw["B"][:, :3]
    with pytest.raises(ValueError, match="shapes do not match"):
        ssd(**kw)


def test_segsums_agree_in_float64():
    x = -torch.rand(3, 2, 37, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    naive, stable = segsum_naive(x), segsum(x)
    assert torch.isinf(stable).sum() == 3 * 2 * 37 * 36 // 2      # -inf exactly above the diagonal
    torch.testing.assert_close(naive, stable, rtol=1e-12, atol=1e-12)


def test_naive_segsum_cancels_in_float32():
    """2048 tokens at dt*A in [-0.1, -0.05]: the running sum reaches about -150, where one fp32
    step is 1.5e-5; differences of it lose that much of every decay. The stable segsum keeps
    fp32 accuracy (checked on every decay that is not ~0)."""
    g = torch.Generator().manual_seed(0)
    x = -(0.05 + 0.05 * torch.rand(2048, generator=g, dtype=torch.float64))
    ref = torch.exp(segsum(x))
    keep = ref > 1e-3
    err = {f.__name__: ((torch.exp(f(x.float())).double() - ref).abs() / ref)[keep].max().item()
           for f in (segsum, segsum_naive)}
    assert err["segsum"] < 1e-6, f"the stable segsum lost fp32 accuracy: {err}"
    assert err["segsum_naive"] > 10 * err["segsum"], f"no cancellation to show: {err}"
