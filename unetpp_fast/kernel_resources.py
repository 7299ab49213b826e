"""`python -m unetpp_fast.kernel_resources`: entry point of `unetpp_fast.ops.kernel_resources`."""

from unetpp_fast.ops.kernel_resources import format_table, kernel_resources

__all__ = ["format_table", "kernel_resources"]

if __name__ == "__main__":
    print(format_table(kernel_resources()))
