import arcflow


def test_build_info_reports_types():
    info = arcflow.build_info()
    assert isinstance(info["openmp"], bool)
    assert info["max_threads"] >= 1
