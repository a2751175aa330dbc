"""Infinite-width kernels of convolutional and fully-connected networks described with neural-tangents' ``stax`` names.

A neural-tangents user ports a model by changing the import::

    from arcflow import stax
    kfn = stax.serial(stax.Conv(64, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
                      stax.Conv(64, (3, 3), padding="SAME", W_std=1.4, b_std=0.1), stax.Relu(),
                      stax.GlobalAvgPool(), stax.Dense(1, W_std=1.4, b_std=0.1))
    k = kfn(x1, x2)             # x: (n, H, W, C) images; k.nngp (CNN-GP), k.ntk (CNTK), (n1, n2)

Layers (ntk parameterization; widths such as ``out_dim`` / ``out_chan`` are accepted and do not change the
infinite-width kernel): ``Dense(out_dim, W_std=1.0, b_std=None)``, ``Conv(out_chan, filter_shape, strides=None,
padding="VALID", W_std=1.0, b_std=None)`` (2-D filters, padding "SAME", "VALID" or "CIRCULAR", stride 1),
``AvgPool(window_shape, strides=None, padding="VALID")``, the readouts ``GlobalAvgPool()`` and ``Flatten()``,
and the activations ``Relu()``, ``LeakyRelu(alpha)``, ``ABRelu(a, b)``, ``Abs()``, ``Erf()``, ``Sign()``,
``RectifiedMonomial(degree)``, ``Identity()``. ``b_std=None`` means no bias, as in neural-tangents.

Which orders are accepted (:func:`serial` says which layer breaks a rule, and where):

* an activation needs a Dense or Conv before it (possibly through AvgPool or GlobalAvgPool), and two activations
  in a row are refused (neural-tangents refuses both: the input of an activation must be Gaussian);
* an image network (one with a Conv, AvgPool or readout) starts with Conv or AvgPool, has exactly one readout
  (Flatten or GlobalAvgPool), and after it only Dense layers and activations (no Conv, AvgPool, second readout);
  a Dense before the readout is refused;
* a fully-connected network is Dense layers and activations and takes (n, d) inputs.

How the kernels are computed: a fully-connected network ``Dense, [act, Dense] * depth`` whose Dense layers share
W_std and b_std and whose activations are all the same goes to the fused fully-connected engine
(:func:`arcflow.kernels`); every other network, convolutional ones included, to the fused convolutional engine
(cpp/src/cpu/conv_kernel.cpp): one pair of images at a time per thread, the covariances of every pair of pixel
positions in the thread's scratch (O((H W)^2), or O(H W) for a Flatten readout without pooling), never an
n1 x n2 x (H W)^2 array; OpenMP over pairs; float32 inputs computed in float32, everything else in float64.
:mod:`arcflow.reference_conv` is the same recursion in NumPy, the engine's oracle in the tests.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import activations as _acts
from ._kernels import _check_get
from ._kernel_fn import _named

__all__ = [
    "Dense", "Conv", "AvgPool", "GlobalAvgPool", "Flatten",
    "Relu", "LeakyRelu", "ABRelu", "Abs", "Erf", "Sign", "RectifiedMonomial", "Identity",
    "serial", "SerialKernelFn", "Layer",
]

_WHERE = "arcflow.stax.serial"
_PADDINGS = ("SAME", "VALID", "CIRCULAR")


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _width(v, name: str, layer: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
        raise ValueError(f"arcflow.stax.{layer}: {name} must be a positive integer, got {_short(v)}")
    return int(v)


def _std(v, name: str, layer: str, allow_none: bool) -> Optional[float]:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) < 0:
        none = " or None (no bias)" if allow_none else ""
        raise ValueError(f"arcflow.stax.{layer}: {name} must be a finite number >= 0{none}, got {_short(v)}")
    return float(v)


def _shape2(v, name: str, layer: str) -> Tuple[int, int]:
    try:
        t = tuple(v)
    except TypeError:
        t = None
    if t is None or len(t) != 2 or not all(
            not isinstance(e, bool) and isinstance(e, numbers.Integral) and int(e) >= 1 for e in t):
        raise ValueError(f"arcflow.stax.{layer}: {name} must be two positive integers (height, width) "
                         f"for 2-D images, got {_short(v)}")
    return (int(t[0]), int(t[1]))


def _padding(v, layer: str) -> str:
    if not isinstance(v, str) or v.upper() not in _PADDINGS:
        raise ValueError(f"arcflow.stax.{layer}: padding must be one of {_PADDINGS}, got {_short(v)}")
    return v.upper()


class Layer:
    """Base class of the layer descriptions: immutable, compared and hashed by their arguments, picklable."""

    __slots__ = ()
    _args: Tuple[str, ...] = ()

    def _values(self):
        return tuple(getattr(self, a) for a in self._args)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **kw):
        for k, v in kw.items():
            object.__setattr__(self, k, v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{a}={getattr(self, a)!r}" for a in self._args) + ")"

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self):
        return hash((type(self).__name__, self._values()))

    def __reduce__(self):
        return (type(self), self._values())


class Dense(Layer):
    """Fully-connected layer (neural-tangents' ``stax.Dense``): ``Sigma <- W_std^2 Sigma + b_std^2``."""

    __slots__ = ("out_dim", "W_std", "b_std")
    _args = ("out_dim", "W_std", "b_std")

    def __init__(self, out_dim: int, W_std: float = 1.0, b_std: Optional[float] = None):
        self._set(out_dim=_width(out_dim, "out_dim", "Dense"), W_std=_std(W_std, "W_std", "Dense", False),
                  b_std=_std(b_std, "b_std", "Dense", True))


class Conv(Layer):
    """2-D convolution (neural-tangents' ``stax.Conv``), stride 1: ``Sigma <- W_std^2 mean_a Sigma[p+a, q+a] +
    b_std^2`` over the filter offsets a, padding "SAME" (zeros), "VALID" or "CIRCULAR" (periodic)."""

    __slots__ = ("out_chan", "filter_shape", "strides", "padding", "W_std", "b_std")
    _args = ("out_chan", "filter_shape", "strides", "padding", "W_std", "b_std")

    def __init__(self, out_chan: int, filter_shape: Sequence[int], strides: Optional[Sequence[int]] = None,
                 padding: str = "VALID", W_std: float = 1.0, b_std: Optional[float] = None):
        fs = _shape2(filter_shape, "filter_shape", "Conv")
        if strides is not None:
            st = _shape2(strides, "strides", "Conv")
            if st != (1, 1):
                raise ValueError(f"arcflow.stax.Conv: only stride 1 is supported (strides=None or (1, 1)), "
                                 f"got strides={_short(strides)}")
            strides = st
        self._set(out_chan=_width(out_chan, "out_chan", "Conv"), filter_shape=fs, strides=strides,
                  padding=_padding(padding, "Conv"), W_std=_std(W_std, "W_std", "Conv", False),
                  b_std=_std(b_std, "b_std", "Conv", True))


class AvgPool(Layer):
    """Average pooling (neural-tangents' ``stax.AvgPool``, ``normalize_edges=False``); strides None is 1."""

    __slots__ = ("window_shape", "strides", "padding")
    _args = ("window_shape", "strides", "padding")

    def __init__(self, window_shape: Sequence[int], strides: Optional[Sequence[int]] = None,
                 padding: str = "VALID"):
        self._set(window_shape=_shape2(window_shape, "window_shape", "AvgPool"),
                  strides=None if strides is None else _shape2(strides, "strides", "AvgPool"),
                  padding=_padding(padding, "AvgPool"))


class GlobalAvgPool(Layer):
    """Readout: the mean over all positions (the kernel: the mean over all pairs of positions)."""

    __slots__ = ()


class Flatten(Layer):
    """Readout: all positions and channels as one vector (the kernel: the mean over same-position pairs)."""

    __slots__ = ()


class _Activation(Layer):
    __slots__ = ()

    @property
    def activation(self) -> _acts.Activation:  # pragma: no cover - overridden
        raise NotImplementedError


class Relu(_Activation):
    """``max(x, 0)``."""

    __slots__ = ()
    activation = property(lambda self: _acts.ReLU())


class LeakyRelu(_Activation):
    """``max(x, 0) + alpha * min(x, 0)``."""

    __slots__ = ("alpha",)
    _args = ("alpha",)

    def __init__(self, alpha: float):
        self._set(alpha=_real(alpha, "alpha", "LeakyRelu"))

    activation = property(lambda self: _acts.LeakyReLU(self.alpha))


class ABRelu(_Activation):
    """``a * min(x, 0) + b * max(x, 0)``."""

    __slots__ = ("a", "b")
    _args = ("a", "b")

    def __init__(self, a: float, b: float):
        self._set(a=_real(a, "a", "ABRelu"), b=_real(b, "b", "ABRelu"))

    activation = property(lambda self: _acts.ABReLU(self.a, self.b))


class Abs(_Activation):
    """``|x|``."""

    __slots__ = ()
    activation = property(lambda self: _acts.Abs())


class Erf(_Activation):
    """``erf(x)`` (neural-tangents' ``Erf()`` with its defaults a=1, b=1, c=0)."""

    __slots__ = ()
    activation = property(lambda self: _acts.Erf())


class Sign(_Activation):
    """``sign(x)``: NNGP only (its derivative is a Dirac delta)."""

    __slots__ = ()
    activation = property(lambda self: _acts.Sign())


class RectifiedMonomial(_Activation):
    """``max(x, 0) ** degree``; degree 0 (the step function) has no NTK."""

    __slots__ = ("degree",)
    _args = ("degree",)

    def __init__(self, degree: int):
        try:
            act = _acts.RectifiedMonomial(degree)
        except ValueError as e:
            raise ValueError(f"arcflow.stax.RectifiedMonomial: {e}".replace("RectifiedMonomial: the order n",
                                                                            "degree")) from None
        self._set(degree=act.n)

    activation = property(lambda self: _acts.RectifiedMonomial(self.degree))


class Identity(_Activation):
    """``x`` (counted as an activation: T = Sigma, Tdot = 1)."""

    __slots__ = ()
    activation = property(lambda self: _acts.Identity())


def _real(v, name: str, layer: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"arcflow.stax.{layer}: {name} must be a finite real number, got {_short(v)}")
    return float(v)


# --------------------------------------------------------------------------------------------------
def _compile(layers) -> Tuple[tuple, bool]:
    """Check the order of the layers; return the ops of arcflow.reference_conv and whether it is an image net."""
    if not layers:
        raise ValueError(f"{_WHERE}: needs at least one layer")
    for k, lay in enumerate(layers):
        if not isinstance(lay, Layer):
            raise TypeError(f"{_WHERE}: layer {k} is {_short(lay)}, not an arcflow.stax layer (Dense, Conv, "
                            f"AvgPool, GlobalAvgPool, Flatten or an activation such as Relu())")
    image = any(isinstance(lay, (Conv, AvgPool, GlobalAvgPool, Flatten)) for lay in layers)
    ops = []
    gaussian = False      # the current layer's output is a Gaussian field: an activation may follow
    prev_act = False
    readout, readout_at = None, -1
    for k, lay in enumerate(layers):
        at = f"{_WHERE}: layer {k} ({lay!r})"
        if isinstance(lay, _Activation):
            if prev_act:
                raise ValueError(f"{at}: two activations in a row (layer {k - 1} is {layers[k - 1]!r}); "
                                 f"put a Dense or Conv between them")
            if not gaussian:
                raise ValueError(f"{at}: an activation needs a Dense or Conv before it (its input must be "
                                 f"Gaussian{'; Flatten does not keep that' if isinstance(readout, Flatten) else ''})")
            ops.append(("act", lay.activation))
            prev_act, gaussian = True, False
            continue
        prev_act = False
        if isinstance(lay, Dense):
            if image and readout is None:
                raise ValueError(f"{at}: a Dense layer on images before the readout; put Flatten() or "
                                 f"GlobalAvgPool() before it (or use a 1x1 Conv)")
            b2 = None if lay.b_std is None else lay.b_std ** 2
            ops.append(("dense", lay.W_std ** 2, b2))
            gaussian = True
        elif isinstance(lay, (Conv, AvgPool)):
            if readout is not None:
                raise ValueError(f"{at}: a {type(lay).__name__} after the readout {readout!r}; the readout "
                                 f"(Flatten or GlobalAvgPool) must come after every Conv and AvgPool")
            if isinstance(lay, Conv):
                b2 = None if lay.b_std is None else lay.b_std ** 2
                ops.append(("conv", *lay.filter_shape, lay.padding, lay.W_std ** 2, b2))
                gaussian = True
            else:
                sh, sw = lay.strides if lay.strides is not None else (1, 1)
                ops.append(("pool", *lay.window_shape, sh, sw, lay.padding))
        else:  # a readout
            if readout is not None:
                raise ValueError(f"{at}: a second readout (layer {readout_at} is {readout!r}); a network has "
                                 f"one readout, after every Conv and AvgPool")
            readout, readout_at = lay, k
            ops.append(("flatten",) if isinstance(lay, Flatten) else ("gap",))
            if isinstance(lay, Flatten):
                gaussian = False
    if image and readout is None:
        raise ValueError(f"{_WHERE}: an image network needs a readout: end the convolutional part with "
                         f"Flatten() or GlobalAvgPool()")
    return tuple(ops), image


def _fc_route(layers):
    """(depth, activation, w_std, b_std) when the network is arcflow.kernels' ``Dense, [act, Dense] * depth``
    with one W_std / b_std and one activation; None otherwise."""
    if len(layers) % 2 == 0 or not all(isinstance(lay, Dense if i % 2 == 0 else _Activation)
                                       for i, lay in enumerate(layers)):
        return None
    dense = {(lay.W_std, lay.b_std or 0.0) for lay in layers[::2]}
    acts = {lay.activation for lay in layers[1::2]}
    if len(dense) != 1 or len(acts) > 1:
        return None
    w, b = dense.pop()
    return (len(layers) // 2, acts.pop() if acts else _acts.ReLU(), w, b)


def _as_input(x, name: str, image: bool) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - any failure to convert is the caller's input
        raise TypeError(f"{_WHERE}: {name} could not be converted to an array: {e}") from None
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) \
            or np.issubdtype(a.dtype, np.complexfloating):
        raise TypeError(f"{_WHERE}: {name} must be a real numeric array, got dtype {a.dtype}")
    want = 4 if image else 2
    if a.ndim != want:
        if image:
            raise ValueError(f"{_WHERE}: {name} must be images of shape (n, H, W, C) for a network with "
                             f"Conv / pooling / readout layers, got shape {a.shape}")
        raise ValueError(f"{_WHERE}: {name} must be 2-D (n, d) for a fully-connected network, got shape "
                         f"{a.shape}" + ("; for images add Conv layers and a readout" if a.ndim == 4 else ""))
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{_WHERE}: {name} contains NaN or infinite values")
    return a


# Pair-recursion work (about one add each, conv_engine::pair_work) per C++ call and thread: well under a second,
# so that Ctrl-C and the progress bar react quickly.
_WORK_PER_CALL = 300_000_000


def _engine_ops(ops) -> list:
    """The compiled layers as the C++ engine's ConvOp list."""
    from . import _core
    from ._kernels import act_params
    kind, pad = _core.ConvOpKind, _core.ConvPadding
    pads = {"VALID": pad.valid, "SAME": pad.same, "CIRCULAR": pad.circular}
    res = []
    for op in ops:
        if op[0] == "dense":
            res.append(_core.ConvOp(kind=kind.dense, w_var=op[1], b_var=op[2] or 0.0))
        elif op[0] == "conv":
            res.append(_core.ConvOp(kind=kind.conv, fh=op[1], fw=op[2], padding=pads[op[3]], w_var=op[4],
                                    b_var=op[5] or 0.0))
        elif op[0] == "pool":
            res.append(_core.ConvOp(kind=kind.pool, fh=op[1], fw=op[2], sh=op[3], sw=op[4], padding=pads[op[5]]))
        elif op[0] == "act":
            res.append(_core.ConvOp(kind=kind.act, act=act_params(op[1])))
        else:
            res.append(_core.ConvOp(kind=kind.flatten if op[0] == "flatten" else kind.gap))
    return res


class SerialKernelFn:
    """The kernel function of a :func:`serial` network: ``kfn(x1, x2=None, get=None)`` and ``kfn.diag(x)``, as
    :class:`arcflow.KernelFn` and neural-tangents' ``kernel_fn``. Immutable, compared by its layers, picklable."""

    __slots__ = ("_layers", "_ops", "_image", "_route")

    def __init__(self, *layers: Layer):
        ops, image = _compile(layers)
        for name, v in (("_layers", tuple(layers)), ("_ops", ops), ("_image", image),
                        ("_route", None if image else _fc_route(layers))):
            object.__setattr__(self, name, v)

    def __setattr__(self, name, value):
        raise AttributeError("the kernel function of arcflow.stax.serial is immutable")

    layers = property(lambda self: self._layers, doc="The layers, in order.")

    @property
    def has_ntk(self) -> bool:
        """False when an activation's derivative is a Dirac delta (Sign, RectifiedMonomial(0)): NNGP only."""
        return all(op[1].has_ntk for op in self._ops if op[0] == "act")

    def _call(self, x1, x2, get, diag: bool, threads=None, out=None, progress=False, device="auto"):
        from . import _dispatch as dp
        from ._kernels import _choose_device
        single = isinstance(get, str)
        names = (("nngp", "ntk") if self.has_ntk else ("nngp",)) if get is None else _check_get(get, _WHERE)
        if len(set(names)) != len(names):
            raise ValueError(f"{_WHERE}: get names a kernel twice: {get!r}")
        if "ntk" in names and not self.has_ntk:
            bad = next(lay for lay in self._layers if isinstance(lay, _Activation) and not lay.activation.has_ntk)
            raise ValueError(f"{_WHERE}: {bad!r} has no NTK (its derivative is a Dirac delta); ask for 'nngp' only")
        threads = dp.check_threads(threads, _WHERE)
        progress = dp.check_bool(progress, "progress", _WHERE)
        use_cuda = _choose_device(device, x1, x2, _WHERE)
        if use_cuda is None:
            raise TypeError(f"{_WHERE}: x1/x2 are GPU arrays; the kernels of stax networks take NumPy arrays "
                            f"(device='cuda' copies them to the GPU): for CuPy, pass x.get()")
        if x2 is x1:  # kfn(x, x): the symmetric path (half the work, an exactly symmetric result)
            x2 = None
        a1 = _as_input(x1, "x1", self._image)
        a2 = None if x2 is None else _as_input(x2, "x2", self._image)
        if a2 is not None and a1.shape[1:] != a2.shape[1:]:
            what = "channels" if self._image and a1.shape[1:3] == a2.shape[1:3] else "shape"
            raise ValueError(f"{_WHERE}: x1 and x2 differ in {what}: x1 has shape {a1.shape}, x2 {a2.shape} "
                             f"(they must agree except in the number of inputs)")
        if a1.shape[-1] == 0:
            raise ValueError(f"{_WHERE}: x1 has no " + ("channels" if self._image else "features") +
                             f" (shape {a1.shape})")
        if self._image:
            self._check_sizes(a1.shape[1:3])
        wanted = tuple(g for g in ("nngp", "ntk") if g in names)
        if self._route is not None:
            from ._kernels import kernels
            depth, act, w, b = self._route
            k = kernels(a1, a2, depth=depth, activation=act, w_std=w, b_std=b, diag=diag, get=wanted,
                        threads=threads, out=out, progress=progress, device=device)
            nngp, ntk = k.nngp, k.ntk
        else:
            nngp, ntk = self._engine(a1, a2, wanted, diag, threads, out, progress, use_cuda)
        res = {"nngp": nngp, "ntk": ntk}
        if single:
            return res[names[0]]
        if get is None:
            from ._kernels import Kernels
            return Kernels(nngp, ntk)
        return _named(tuple(names))(*(res[g] for g in names))

    def _engine(self, a1, a2, wanted, diag: bool, threads: int, out, progress: bool, use_cuda=False):
        """The fused C++ engine (cpp/src/cpu/conv_kernel.cpp, or on the GPU cpp/src/cuda/conv_kernel.cu): rows of
        x1 in blocks between which Python handles Ctrl-C and the progress bar; float32 inputs are computed in
        float32. use_cuda: True, False or "auto" (the GPU from _AUTO_CUDA_WORK pair-ops on)."""
        from . import _core, _dispatch as dp
        from ._kernels import _AUTO_CUDA_WORK, _collect_out, _engine_call, _Progress
        dtype = dp.result_dtype(a1, a2)
        x1 = dp.as_engine_input(a1, dtype)
        x2 = None if a2 is None else dp.as_engine_input(a2, dtype)
        if not self._image:  # rows are 1 x 1 images with d channels
            x1 = x1.reshape(x1.shape[0], 1, 1, x1.shape[1])
            x2 = None if x2 is None else x2.reshape(x2.shape[0], 1, 1, x2.shape[1])
        n1, h, w, c = x1.shape
        n2 = n1 if x2 is None else x2.shape[0]
        shape = (n1,) if diag else (n1, n2)
        outs = _collect_out(out, wanted, wanted, shape, dtype, _WHERE)
        dp.check_no_overlap([(f"out[{k!r}]", v) for k, v in outs.items()], [("x1", x1), ("x2", x2)], _WHERE)
        f32 = dtype == np.float32
        engine_cls = _core.ConvEngineF32 if f32 else _core.ConvEngineF64
        ops = _engine_ops(self._ops)
        missing = [g for g in wanted if outs.get(g) is None]
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize * len(missing)
        n_self = n1 + (0 if x2 is None or diag else n2)
        pairs = n1 if diag else (n1 * (n1 - 1) // 2 if x2 is None else n1 * n2)
        work = engine_cls.pair_work(h, w, c, ops)
        if use_cuda == "auto":
            use_cuda = work * (pairs + n_self) >= _AUTO_CUDA_WORK
        if use_cuda:
            engine_cls = _core.ConvEngineCudaF32 if f32 else _core.ConvEngineCudaF64
            dp.check_allocation(nbytes, _WHERE, f"the output ({nbytes} bytes)",
                                hint="compute the kernel in blocks of rows")
        else:
            scratch = engine_cls.scratch_bytes(h, w, c, ops) * max(1, min(threads, max(pairs, n_self)))
            tables = engine_cls.table_bytes(n_self, h, w, ops)
            dp.check_allocation(nbytes + scratch + tables, _WHERE,
                                f"the output ({nbytes} bytes), the per-thread pixel-pair buffers ({scratch} bytes) "
                                f"and the per-image variance tables ({tables} bytes)",
                                hint="use fewer threads, smaller images, or compute the kernel in blocks of rows")
        for g in missing:
            outs[g] = dp.allocate(shape, dtype, _WHERE)
        res = (outs.get("nngp"), outs.get("ntk"))
        if n1 == 0 or (n2 == 0 and not diag):
            return res
        # the CPU engine's last argument is its thread count, the GPU engine's the device (-1: the current one)
        last = -1 if use_cuda else threads
        engine = _engine_call(_WHERE, engine_cls, x1, None if diag else x2, ops, "ntk" in wanted, last)
        if diag:
            _engine_call(_WHERE, engine.diag, *res)
            return res
        per_row = work * (n2 / 2 if x2 is None else n2)
        if use_cuda:  # enough pairs per launch for every resident block several times over
            block = max(1, int(max(_WORK_PER_CALL * 16, 8 * engine.blocks * work) // max(per_row, 1.0)))
        else:
            block = max(1, int(_WORK_PER_CALL * threads // max(per_row, 1.0)))
        bar = _Progress(n1, progress, _WHERE)
        try:
            for r0 in range(0, n1, block):
                r1 = min(n1, r0 + block)
                if use_cuda:
                    _engine_call(_WHERE, engine.rows, r0, r1, *res)
                else:
                    _engine_call(_WHERE, engine.rows, r0, r1, *res, threads)
                bar.update(r1 - r0)
        finally:
            bar.close()
        return res

    def _check_sizes(self, hw):
        from .reference_conv import spatial_shapes
        if 0 in hw:
            raise ValueError(f"{_WHERE}: the images are empty: height x width = {hw[0]} x {hw[1]}")
        shapes = spatial_shapes(self._ops, hw)
        for k, (lay, before, after) in enumerate(zip(self._layers, shapes, shapes[1:])):
            if after is not None and 0 in after:
                win = lay.filter_shape if isinstance(lay, Conv) else lay.window_shape
                raise ValueError(f"{_WHERE}: layer {k} ({lay!r}) needs images of at least {win[0]} x {win[1]} "
                                 f"with VALID padding, but its input is {before[0]} x {before[1]} "
                                 f"(from {hw[0]} x {hw[1]} images)")

    def __call__(self, x1, x2=None, get: Union[None, str, Sequence[str]] = None, *, threads: Optional[int] = None,
                 out=None, progress: bool = False, device: str = "auto"):
        """The kernels between the inputs x1 and x2 (x2=None: x1 with itself): (n1, n2) arrays.

        get : None gives both, as :class:`arcflow.Kernels` (ntk None for a network without an NTK); one name
            ("nngp" or "ntk") gives that array; a tuple of names gives a named tuple with those fields in order.
        threads : OpenMP threads (default :func:`arcflow.get_num_threads`).
        out : preallocated outputs (e.g. ``np.memmap``), as in :func:`arcflow.kernels`: one array for one
            kernel, or a dict / sequence by name; left partly written when the call is interrupted (Ctrl-C).
        progress : show a progress bar (tqdm when installed) on stderr.
        device : "cpu", "cuda" or "auto" (the GPU for large problems when arcflow was built with CUDA and a
            device is present), as in :func:`arcflow.kernels`. On the GPU the inputs are NumPy arrays copied to the
            device and the result is NumPy (``out=`` and ``progress`` as on the CPU); ``threads`` is unused there.
        """
        return self._call(x1, x2, get, False, threads, out, progress, device)

    def diag(self, x, get: Union[None, str, Sequence[str]] = None, *, threads: Optional[int] = None,
             device: str = "auto"):
        """k(x[i], x[i]) for every input, shape (n,); ``get`` and ``device`` as in ``__call__``."""
        return self._call(x, None, get, True, threads, device=device)

    def __repr__(self) -> str:
        return "arcflow.stax.serial(" + ", ".join(repr(lay) for lay in self._layers) + ")"

    def __eq__(self, other):
        if not isinstance(other, SerialKernelFn):
            return NotImplemented
        return self._layers == other._layers

    def __hash__(self):
        return hash(self._layers)

    def __reduce__(self):
        return (serial, self._layers)


def serial(*layers: Layer) -> SerialKernelFn:
    """The kernel function of the network ``layers[0] -> layers[1] -> ...`` (neural-tangents' ``stax.serial``,
    returning only its ``kernel_fn``). The order is checked here; see the module docstring for the rules.

    >>> import numpy as np
    >>> from arcflow import stax
    >>> kfn = stax.serial(stax.Conv(8, (3, 3), padding="SAME", b_std=0.1), stax.Relu(), stax.GlobalAvgPool())
    >>> kfn(np.random.default_rng(0).normal(size=(5, 6, 6, 2)), get="ntk").shape
    (5, 5)
    """
    return SerialKernelFn(*layers)
