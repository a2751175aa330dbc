"""Normalising-flow blocks (arcflow.invertible.flows): exact inversion, log|det J| against a brute-force
finite-difference Jacobian, ActNorm's data-dependent initialisation, dtypes, state_dict, errors."""
import numpy as np
import pytest

from arcflow.invertible import ActNorm, AffineCoupling, InvertibleConv1x1, Sequential
from arcflow.invertible import _providers
from arcflow.invertible._backend import CpuOps
from arcflow.invertible.flows import _conv2d_numpy
from _helpers.invertible import assert_differs

DTYPES = [np.float32, np.float64]
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def _rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b)


def _actnorm(c, rng):
    """An initialised ActNorm with scales far from 1 (so its log-determinant is not ~0)."""
    g = np.random.default_rng(rng)
    a = ActNorm(c)
    a.load_state_dict({"loc": g.normal(size=c), "scale": g.uniform(0.3, 3.0, c) * g.choice([-1, 1], c)})
    return a


def _conv1x1(c, rng, lu=True):
    """An InvertibleConv1x1 whose diagonal s is rescaled, so log|det W| != 0."""
    b = InvertibleConv1x1(c, lu=lu, rng=rng)
    sd = b.state_dict()
    g = np.random.default_rng(rng + 100)
    if lu:
        sd["s"] = sd["s"] * g.uniform(0.5, 2.0, c)
    else:
        sd["weight"] = sd["weight"] * g.uniform(0.5, 2.0, (c, 1))
    b.load_state_dict(sd)
    return b


def _coupling(c, rng, hidden=8, **kw):
    return AffineCoupling(c, hidden=hidden, rng=rng, zero_init=False, **kw)


def _blocks(c=4):
    return {
        "coupling": _coupling(c, 1),
        "coupling_odd": _coupling(c + 1, 2) if c % 2 == 0 else _coupling(c, 2),
        "actnorm": _actnorm(c, 3),
        "conv1x1_lu": _conv1x1(c, 4),
        "conv1x1_full": _conv1x1(c, 5, lu=False),
        "sequential": Sequential(_actnorm(c, 6), _conv1x1(c, 7), _coupling(c, 8), _conv1x1(c, 9), _coupling(c, 10)),
    }


def _fd_logdet(block, x, h=1e-3):
    """log|det J| of block.forward at the single sample x (1, C, H, W), J by the 5-point central stencil."""
    n = x.size
    jac = np.empty((n, n))
    for k in range(n):
        e = np.zeros(n)
        e[k] = h
        e = e.reshape(x.shape)
        f = [block.forward(x + m * e).ravel() for m in (2, 1, -1, -2)]
        jac[:, k] = (-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * h)
    sign, ld = np.linalg.slogdet(jac)
    assert sign != 0
    return ld


# ---------------------------------------------------------------------------------------------------- inversion

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(_blocks()))
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (1, 4, 1, 1), (2, 4, 8, 8)])
def test_inverse_exact(name, dtype, shape):
    c = shape[1]
    block = _blocks(c)[name]
    if name == "coupling_odd":
        shape = (shape[0], c + 1) + shape[2:]
    x = np.random.default_rng(0).normal(size=shape).astype(dtype)
    y = block.forward(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert _rel(y, x) > 1e-3                       # the block does something
    xr = block.inverse(y)
    assert xr.dtype == dtype
    assert _rel(xr, x) <= TOL[dtype]
    assert _rel(block.forward(block.inverse(x)), x) <= TOL[dtype]


def test_inverse_exact_deep_sequential():
    c = 6
    blocks = []
    for i in range(6):
        blocks += [ActNorm(c), InvertibleConv1x1(c, rng=i), _coupling(c, 10 + i, hidden=16)]
    flow = Sequential(*blocks)
    x = np.random.default_rng(1).normal(size=(4, c, 6, 5))
    y = flow.forward(x)                       # initialises the ActNorms in passing
    assert all(b.initialized for b in flow if isinstance(b, ActNorm))
    assert _rel(flow.inverse(y), x) <= 1e-12
    y32 = flow.forward(x.astype(np.float32))
    assert _rel(flow.inverse(y32), x) <= 1e-5


def test_noncontiguous_input():
    block = _blocks()["sequential"]
    x = np.random.default_rng(2).normal(size=(3, 8, 5, 6))[:, ::2]
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(block.forward(x), block.forward(np.ascontiguousarray(x)))


# ---------------------------------------------------------------------------------------------------- log-det

@pytest.mark.parametrize("name", list(_blocks()))
def test_logdet_matches_finite_difference_jacobian(name):
    block = _blocks(4)[name]
    c = 5 if name == "coupling_odd" else 4
    x = np.random.default_rng(3).normal(size=(1, c, 2, 2))
    ld = block.logdet(x)
    assert ld.shape == (1,)
    y, ld2 = block.forward(x, return_logdet=True)
    np.testing.assert_array_equal(ld, ld2)
    np.testing.assert_array_equal(y, block.forward(x))
    ref = _fd_logdet(block, x)
    assert abs(ref) > 0.05                           # a relative test of a non-trivial value
    assert abs(ld[0] - ref) <= 1e-6 * abs(ref)


def test_logdet_per_sample_and_formulas():
    g = np.random.default_rng(4)
    x = g.normal(size=(3, 4, 3, 5))
    a = _actnorm(4, 11)
    np.testing.assert_allclose(a.logdet(x), -15 * np.sum(np.log(np.abs(a.scale))) * np.ones(3), rtol=1e-14)
    w = _conv1x1(4, 12)
    np.testing.assert_allclose(w.logdet(x), 15 * np.linalg.slogdet(w.weight)[1] * np.ones(3), rtol=1e-12)
    cp = _coupling(4, 13)
    ld = cp.logdet(x)
    assert ld.shape == (3,) and len(set(ld.tolist())) == 3            # depends on the sample
    for n in range(3):
        np.testing.assert_allclose(ld[n], cp.logdet(x[n:n + 1])[0], rtol=1e-13)
    # Sequential sums the blocks' log-dets along the forward pass
    seq = Sequential(a, w, cp)
    y1 = a.forward(x)
    y2 = w.forward(y1)
    np.testing.assert_allclose(seq.logdet(x), a.logdet(x) + w.logdet(y1) + cp.logdet(y2), rtol=1e-13)
    assert cp.logdet(x.astype(np.float32)).dtype == np.float32


def test_coupling_soft_clamp_bounds_the_log_scale():
    clamp = 0.5
    cp = AffineCoupling(4, hidden=8, clamp=clamp, rng=0, zero_init=False)
    sd = cp.state_dict()
    sd["subnet.4.weight"] *= 1e3                       # huge raw log-scales
    cp.load_state_dict(sd)
    x = np.random.default_rng(5).normal(size=(2, 4, 3, 3))
    assert np.all(np.abs(cp.logdet(x)) < clamp * 2 * 9)   # |s| < clamp on each of the 2*3*3 entries
    assert _rel(cp.inverse(cp.forward(x)), x) <= 1e-12


def test_coupling_default_init_is_identity():
    cp = AffineCoupling(6, hidden=8, rng=0)
    x = np.random.default_rng(6).normal(size=(2, 6, 4, 4))
    np.testing.assert_array_equal(cp.forward(x), x)
    np.testing.assert_array_equal(cp.logdet(x), np.zeros(2))


def test_coupling_user_subnet():
    g = np.random.default_rng(7)
    w = g.normal(size=(4, 2, 1, 1))

    def net(x1):                                       # smooth, C1 = 2 -> 2 * C2 = 4 channels
        return np.tanh(_conv2d_numpy(x1, w, None, 0))

    cp = AffineCoupling(4, subnet=net, clamp=1.5)
    x = g.normal(size=(1, 4, 2, 2))
    y = cp.forward(x)
    np.testing.assert_array_equal(y[:, :2], x[:, :2])
    a = net(x[:, :2])
    s = 1.5 * 0.636 * np.arctan(a[:, :2] / 1.5)
    np.testing.assert_allclose(y[:, 2:], x[:, 2:] * np.exp(s) + a[:, 2:], rtol=1e-14)
    assert abs(cp.logdet(x)[0] - _fd_logdet(cp, x)) <= 1e-6 * abs(cp.logdet(x)[0])
    assert cp.state_dict() == {}
    with pytest.raises(ValueError, match="subnet returned shape"):
        AffineCoupling(4, subnet=lambda x1: x1).forward(x)


def test_coupling_matches_direct_formula():
    """The default NN is conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3, checked with a loop convolution."""
    cp = _coupling(4, 14, hidden=3)
    sd = cp.state_dict()
    x = np.random.default_rng(8).normal(size=(2, 4, 3, 4))

    def conv(z, w, b, pad):
        n, c, h, wd = z.shape
        zp = np.pad(z, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        k = w.shape[2]
        out = np.zeros((n, w.shape[0], h + 2 * pad - k + 1, wd + 2 * pad - k + 1))
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                out[:, :, i, j] = np.einsum("ncuv,ocuv->no", zp[:, :, i:i + k, j:j + k], w) + b
        return out

    a = np.maximum(conv(x[:, :2], sd["subnet.0.weight"], sd["subnet.0.bias"], 1), 0)
    a = np.maximum(conv(a, sd["subnet.2.weight"], sd["subnet.2.bias"], 0), 0)
    a = conv(a, sd["subnet.4.weight"], sd["subnet.4.bias"], 1)
    s = 2.0 * 0.636 * np.arctan(a[:, :2] / 2.0)
    np.testing.assert_allclose(cp.forward(x)[:, 2:], x[:, 2:] * np.exp(s) + a[:, 2:], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cp.logdet(x), s.sum(axis=(1, 2, 3)), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------- ActNorm

@pytest.mark.parametrize("dtype", DTYPES)
def test_actnorm_data_dependent_init(dtype):
    g = np.random.default_rng(9)
    x = (g.normal(size=(5, 3, 4, 6)) * np.array([0.1, 2.0, 7.0]).reshape(1, 3, 1, 1)
         + np.array([-3.0, 0.5, 10.0]).reshape(1, 3, 1, 1)).astype(dtype)
    a = ActNorm(3)
    assert not a.initialized
    with pytest.raises(ValueError, match="not initialised"):
        a.inverse(x)
    y = a.forward(x)
    assert a.initialized and y.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=tol)
    np.testing.assert_allclose(y.astype(np.float64).var(axis=(0, 2, 3)), 1, rtol=tol)
    # later batches use the stored statistics
    x2 = g.normal(size=(2, 3, 4, 6))
    sd = a.state_dict()
    np.testing.assert_allclose(a.forward(x2), (x2 - sd["loc"].reshape(1, 3, 1, 1)) / sd["scale"].reshape(1, 3, 1, 1))
    # explicit initialize; a constant channel gets scale 1
    b = ActNorm(2)
    xc = np.stack([np.full((4, 4), 3.0), g.normal(size=(4, 4))])[None]
    b.initialize(xc)
    assert b.initialized and b.scale[0] == 1.0 and b.loc[0] == 3.0
    # logdet initialises too
    c = ActNorm(3)
    ld = c.logdet(x.astype(np.float64))
    assert c.initialized
    np.testing.assert_allclose(ld, -24 * np.sum(np.log(c.scale)) * np.ones(5))


# ---------------------------------------------------------------------------------------------------- conv 1x1

def test_conv1x1_lu_factors():
    c = 7
    b = InvertibleConv1x1(c, rng=0)
    sd = b.state_dict()
    p = sd["perm"]
    np.testing.assert_array_equal(p @ p.T, np.eye(c))
    assert np.all(np.tril(sd["upper"]) == 0) and np.all(np.triu(sd["lower"]) == 0)
    w = p @ (sd["lower"] + np.eye(c)) @ (sd["upper"] + np.diag(sd["s"]))
    np.testing.assert_allclose(b.weight, w, rtol=0, atol=1e-15)
    np.testing.assert_allclose(w @ w.T, np.eye(c), atol=1e-13)      # a random rotation at initialisation
    np.testing.assert_array_equal(InvertibleConv1x1(c, rng=0).weight, b.weight)   # seeded
    assert_differs(InvertibleConv1x1(c, rng=1).weight, b.weight)
    x = np.random.default_rng(10).normal(size=(2, c, 3, 3))
    np.testing.assert_allclose(b.forward(x), np.einsum("oc,nchw->nohw", w, x), atol=1e-14)


# ---------------------------------------------------------------------------------------------------- Sequential

class _Shuffle:
    """A volume-preserving user block (a channel reversal) without a logdet method."""
    volume_preserving = True

    def forward(self, x):
        return np.ascontiguousarray(np.asarray(x)[:, ::-1])

    def inverse(self, y):
        return np.ascontiguousarray(np.asarray(y)[:, ::-1])


class _NoLogdet(_Shuffle):
    volume_preserving = False


def test_sequential_blocks_without_logdet():
    x = np.random.default_rng(11).normal(size=(2, 4, 3, 3))
    cp = _coupling(4, 15)
    seq = Sequential(_Shuffle(), cp, _Shuffle())
    y, ld = seq.forward(x, return_logdet=True)
    np.testing.assert_allclose(ld, cp.logdet(x[:, ::-1]), rtol=1e-14)
    assert _rel(seq.inverse(y), x) <= 1e-12
    with pytest.raises(ValueError, match="no logdet"):
        Sequential(_NoLogdet(), cp).logdet(x)
    y0, ld0 = Sequential(_Shuffle()).forward(x, return_logdet=True)
    np.testing.assert_array_equal(ld0, np.zeros(2))
    with pytest.raises(TypeError):
        Sequential(object())
    assert len(seq) == 3 and seq[1] is cp and list(seq)[2] is seq[2]


def test_sequential_state_dict_roundtrip():
    a = _blocks()["sequential"]
    b = Sequential(ActNorm(4), InvertibleConv1x1(4, rng=1), _coupling(4, 2), InvertibleConv1x1(4, rng=3),
                   _coupling(4, 4))
    sd = a.state_dict()
    assert "0.loc" in sd and "1.perm" in sd and "2.subnet.0.weight" in sd and "4.subnet.4.bias" in sd
    b.load_state_dict(sd)
    assert b[0].initialized
    x = np.random.default_rng(12).normal(size=(2, 4, 3, 3))
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    np.testing.assert_array_equal(a.logdet(x), b.logdet(x))


# ---------------------------------------------------------------------------------------------------- state_dict errors

@pytest.mark.parametrize("name", list(_blocks()))
def test_load_state_dict_errors_leave_weights_unchanged(name):
    block = _blocks()[name]
    c = 5 if name == "coupling_odd" else 4
    x = np.random.default_rng(13).normal(size=(1, c, 3, 3))
    before = block.forward(x)
    sd = block.state_dict()
    k0 = sorted(sd)[0]
    missing = {k: v for k, v in sd.items() if k != k0}
    extra = dict(sd, bogus=np.zeros(3))
    shaped = dict(sd)
    shaped[k0] = np.zeros(sd[k0].shape + (2,))
    nan = {k: v.copy() for k, v in sd.items()}
    nan[k0].flat[0] = np.nan
    # a mix: one key fine, one with a new value, and one wrongly shaped -> nothing may change
    mixed = {k: v + 1.0 for k, v in sd.items()}
    k_last = sorted(sd)[-1]
    mixed[k_last] = np.zeros((1,) + sd[k_last].shape)
    for bad, what in [(missing, "missing keys"), (extra, "unexpected keys"), (shaped, "wrongly shaped"),
                      (nan, "NaN"), (mixed, "wrongly shaped")]:
        with pytest.raises(ValueError, match=what) as info:
            block.load_state_dict(bad)
        assert repr(k0 if what != "unexpected keys" else "bogus").strip("'") in str(info.value) \
            or what == "wrongly shaped"
        np.testing.assert_array_equal(block.forward(x), before)
        assert {k: v.tolist() for k, v in block.state_dict().items()} == {k: v.tolist() for k, v in sd.items()}
    block.load_state_dict(missing, strict=False)          # non-strict: a subset is fine
    np.testing.assert_array_equal(block.forward(x), before)


def test_load_state_dict_invalid_values():
    a = ActNorm(2)
    with pytest.raises(ValueError, match="scale"):
        a.load_state_dict({"loc": np.zeros(2), "scale": np.array([1.0, 0.0])})
    assert not a.initialized
    w = InvertibleConv1x1(3, rng=0)
    sd = w.state_dict()
    before = w.weight
    with pytest.raises(ValueError, match="perm"):
        w.load_state_dict(dict(sd, perm=np.ones((3, 3))))
    with pytest.raises(ValueError, match="s \\(contains 0\\)"):
        w.load_state_dict(dict(sd, s=np.array([1.0, 0.0, 2.0])))
    np.testing.assert_array_equal(w.weight, before)
    with pytest.raises(ValueError, match="singular"):
        InvertibleConv1x1(2, lu=False).load_state_dict({"weight": np.ones((2, 2))})
    # Sequential: a value error in the second block rolls back the first
    seq = Sequential(_actnorm(2, 0), ActNorm(2))
    sd = seq.state_dict()
    bad = {k: v + 1.0 for k, v in sd.items()}
    bad["1.scale"] = np.zeros(2)
    with pytest.raises(ValueError, match="scale"):
        seq.load_state_dict(bad)
    for k, v in seq.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    assert seq[0].initialized and not seq[1].initialized


# ---------------------------------------------------------------------------------------------------- input errors

@pytest.mark.parametrize("name", list(_blocks()))
def test_bad_input(name):
    block = _blocks()[name]
    c = 5 if name == "coupling_odd" else 4
    block.forward(np.zeros((1, c, 2, 2)) + 0.5)       # initialises anything data-dependent
    # a Sequential reports its first block (forward) or its last block (inverse)
    names = ((type(block).__name__,) * 2 if name != "sequential" else ("ActNorm", "AffineCoupling.inverse"))
    shape = f"(N, {c}, H, W)"
    for fn, blockname in zip((block.forward, block.inverse), names):
        with pytest.raises(ValueError, match=blockname) as info:
            fn(np.zeros((c, 2, 2)))
        assert shape in str(info.value)
        with pytest.raises(ValueError, match=blockname) as info:
            fn(np.zeros((1, c + 2, 2, 2)))
        assert shape in str(info.value)
        bad = np.zeros((1, c, 2, 2))
        bad[0, 1, 1, 0] = np.nan
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(bad)
        bad[0, 1, 1, 0] = np.inf
        with pytest.raises(ValueError, match="NaN or Inf"):
            fn(bad)
    with pytest.raises(TypeError):
        block.forward(np.zeros((1, c, 2, 2), dtype=complex))


def test_bad_construction():
    with pytest.raises(ValueError, match="AffineCoupling"):
        AffineCoupling(1)
    with pytest.raises(ValueError, match="ActNorm"):
        ActNorm(0)
    with pytest.raises(ValueError, match="InvertibleConv1x1"):
        InvertibleConv1x1(0)
    with pytest.raises(ValueError, match="ActNorm.initialize"):
        ActNorm(2).initialize(np.zeros((0, 2, 3, 3)))


def test_integer_input_computes_in_float64():
    cp = _coupling(4, 16)
    x = np.arange(2 * 4 * 3 * 3).reshape(2, 4, 3, 3) % 5
    y = cp.forward(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(cp.inverse(y), x, atol=1e-12)


class _NumpyConvOps(CpuOps):
    """The CPU provider with its convolution replaced by the NumPy im2col oracle."""

    def conv(self, x, w, b, stride, pad, *, in_relu=False, fused=(), where="conv2d", **kw):
        assert stride == 1 and not kw
        bad = 1 if "x" in fused and not np.isfinite(x).all() else 0
        return _conv2d_numpy(np.maximum(x, 0) if in_relu else x, w, b, pad), bad


def test_cpp_and_numpy_convolutions_agree():
    cp = _coupling(6, 17, hidden=5)
    x = np.random.default_rng(14).normal(size=(2, 6, 5, 4))
    y, ld = cp.forward(x, return_logdet=True)
    with _providers.forced(_NumpyConvOps(1)):
        y2, ld2 = cp.forward(x, return_logdet=True)
        back = cp.inverse(y2)
    np.testing.assert_allclose(y, y2, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(ld, ld2, rtol=1e-13)
    assert _rel(back, x) <= 1e-12


def test_sequential_with_irevnet_blocks():
    from arcflow.invertible import InjectivePad, IRevNetBlock, SpaceToDepth
    g = np.random.default_rng(15)
    x = g.normal(size=(2, 4, 4, 4))
    cp = _coupling(16, 18)
    flow = Sequential(_actnorm(4, 19), SpaceToDepth(2), IRevNetBlock(16, 8, stride=1, rng=0, dtype=np.float64),
                      InvertibleConv1x1(16, rng=20), cp)
    y, ld = flow.forward(x, return_logdet=True)
    assert y.shape == (2, 16, 2, 2)
    assert _rel(flow.inverse(y), x) <= 1e-12
    h = x
    for b in flow.blocks[:4]:
        h = b.forward(h)
    np.testing.assert_allclose(ld, flow[0].logdet(x) + cp.logdet(h), rtol=1e-12)
    y32 = flow.forward(x.astype(np.float32))
    assert y32.dtype == np.float32 and _rel(flow.inverse(y32), x) <= 1e-5
    # the injective padding is not a bijection: no log-determinant
    padded = Sequential(InjectivePad(2), ActNorm(6))
    assert _rel(padded.inverse(padded.forward(x)), x) <= 1e-12
    with pytest.raises(ValueError, match="InjectivePad"):
        padded.logdet(x)
