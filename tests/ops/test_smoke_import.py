import unetpp_fast
import unetpp_fast.ops.triton


def test_build_info_has_versions():
    info = unetpp_fast.build_info()
    assert info["running_torch"]
    assert unetpp_fast.ops.triton.__name__ == "unetpp_fast.ops.triton"
