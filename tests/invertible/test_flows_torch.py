"""The flow blocks against small PyTorch implementations (tests/invertible/make_torch_golden.py) with the same weights
(optional: skipped without torch; CI compares with recorded outputs, tests/invertible/test_torch_golden.py), and their
log|det J| against the autograd Jacobian."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from arcflow.invertible import ActNorm, AffineCoupling, InvertibleConv1x1, Sequential  # noqa: E402
from make_torch_golden import TorchActNorm, TorchConv1x1, TorchCoupling  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _coupling_pair(c=6, hidden=16, clamp=2.0, seed=0):
    torch.manual_seed(seed)
    tm = TorchCoupling(c, hidden, clamp)
    ours = AffineCoupling(c, hidden=hidden, clamp=clamp, rng=seed)
    ours.load_state_dict(tm.state_dict(), strict=True)       # torch tensors, the keys of torch.nn.Sequential
    return tm, ours


@pytest.mark.parametrize("c", [4, 5])
def test_coupling_matches_torch_float32(c):
    tm, ours = _coupling_pair(c=c)
    x = np.random.default_rng(1).normal(size=(3, c, 7, 6)).astype(np.float32)
    with torch.no_grad():
        yt = tm(torch.from_numpy(x)).numpy()
        xt = tm.inverse(torch.from_numpy(yt)).numpy()
    y = ours.forward(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, yt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.inverse(yt), xt, rtol=1e-5, atol=1e-5)
    # and the other way: our weights in the torch module
    ours2 = AffineCoupling(c, hidden=16, rng=7, zero_init=False)
    tm.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in ours2.state_dict().items()},
                       strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(ours2.forward(x), tm(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_conv1x1_matches_torch_float32():
    ours = InvertibleConv1x1(6, rng=3)
    sd = ours.state_dict()
    sd["s"] = sd["s"] * np.linspace(0.5, 2.0, 6)
    ours.load_state_dict(sd)
    tm = TorchConv1x1(sd)
    x = np.random.default_rng(2).normal(size=(2, 6, 5, 5)).astype(np.float32)
    with torch.no_grad():
        yt = tm(torch.from_numpy(x)).numpy()
        xt = tm.inverse(torch.from_numpy(yt)).numpy()
    np.testing.assert_allclose(ours.forward(x), yt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.inverse(yt), xt, rtol=1e-5, atol=1e-5)


def _autograd_logdet(fn, x):
    jac = torch.autograd.functional.jacobian(fn, torch.from_numpy(x))
    n = x.size
    sign, ld = torch.linalg.slogdet(jac.reshape(n, n))
    assert sign != 0
    return float(ld)


def test_logdet_matches_autograd_jacobian():
    g = np.random.default_rng(3)
    c = 4
    x = g.normal(size=(1, c, 2, 2))
    # coupling with random weights (float64 torch module)
    tm, cp = _coupling_pair(c=c, hidden=8, seed=4)
    tm = tm.double()
    np.testing.assert_allclose(cp.logdet(x)[0], _autograd_logdet(tm, x), rtol=1e-10)
    # 1x1 convolution with a non-trivial determinant
    w = InvertibleConv1x1(c, rng=5)
    sd = w.state_dict()
    sd["s"] = sd["s"] * np.array([0.5, 3.0, 1.5, 0.7])
    w.load_state_dict(sd)
    tw = TorchConv1x1(sd)
    np.testing.assert_allclose(w.logdet(x)[0], _autograd_logdet(tw, x), rtol=1e-10)
    # ActNorm after data-dependent initialisation on another batch
    a = ActNorm(c)
    a.initialize(g.normal(size=(8, c, 3, 3)) * np.array([0.2, 1.0, 3.0, 5.0]).reshape(1, c, 1, 1))
    ta = TorchActNorm(a.state_dict())
    np.testing.assert_allclose(a.logdet(x)[0], _autograd_logdet(ta, x), rtol=1e-10)
    # and the chain
    seq = Sequential(a, w, cp)

    def chain(z):
        return tm(tw(ta(z)))

    np.testing.assert_allclose(seq.forward(x), chain(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(seq.logdet(x)[0], _autograd_logdet(chain, x), rtol=1e-10)
