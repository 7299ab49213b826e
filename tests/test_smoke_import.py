import unetpp_fast.kernels

import unetpp_fast


def test_build_info_has_versions():
    info = unetpp_fast.build_info()
    assert info["running_torch"]
    assert unetpp_fast.kernels.__name__ == "unetpp_fast.kernels"
