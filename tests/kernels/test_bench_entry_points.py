"""The benchmark-only entry points live in the private submodule arcflow._core._bench, not in _core itself."""
import math

from arcflow import _core


def test_acos_throughput_is_in_the_bench_submodule():
    assert not hasattr(_core, "acos_throughput")
    rate = _core._bench.acos_throughput(False, 0.01)
    assert math.isfinite(rate) and rate > 0


def test_cuda_asin_throughput_is_in_the_bench_submodule():
    assert not hasattr(_core, "cuda_asin_throughput")
    # Built with CUDA: the device's arcsine rate is a _bench entry point (calling it needs a GPU).
    assert hasattr(_core._bench, "asin_throughput") == bool(getattr(_core, "built_with_cuda", False))
