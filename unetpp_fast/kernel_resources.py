"""`python -m unetpp_fast.kernel_resources`: entry point of `unetpp_fast.ops.kernel_resources`.

    python -m unetpp_fast.kernel_resources                      # registers / smem / spills per kernel
    python -m unetpp_fast.kernel_resources --estimate [--json]  # static performance model (sm_90 SASS)
    python -m unetpp_fast.kernel_resources --estimate --backward  # the same for the cuda fused backward

A facade (exempt from the layer rule): `--estimate` runs `unetpp_fast.bench.static_estimate`.
"""

import sys

from unetpp_fast.ops.kernel_resources import format_table, kernel_resources

__all__ = ["format_table", "kernel_resources"]

if __name__ == "__main__":
    if "--estimate" in sys.argv[1:]:
        from unetpp_fast.bench.static_estimate import main

        sys.exit(main([arg for arg in sys.argv[1:] if arg != "--estimate"]))
    print(format_table(kernel_resources()))
