import arcflow


def test_build_info_reports_types():
    info = arcflow.build_info()
    assert isinstance(info["openmp"], bool)
    assert info["max_threads"] >= 1


def _info_in_subprocess(isa):
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, ARCFLOW_ISA=isa)
    code = "import arcflow, json; print(json.dumps(arcflow.build_info()['simd']))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_build_info_reports_the_simd_level_and_its_cap():
    levels = arcflow.build_info()["simd"]["levels"]
    assert levels[0] == "generic"
    capped = _info_in_subprocess("generic")
    assert capped["kernels"] == "generic" and capped["conv2d"] == "generic"
    best = _info_in_subprocess("auto")
    assert best["kernels"] == levels[-1]


def test_build_info_names_an_invalid_simd_cap():
    info = _info_in_subprocess("bogus")
    assert "ARCFLOW_ISA" in info["error"] and "bogus" in info["error"]
