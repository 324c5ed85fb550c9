"""``python -m ublk_driver.testbed provision|run|info`` (same as ``ublkml vm ...``)."""

import sys

from ublk_driver.testbed._vm import vm_main

if __name__ == "__main__":
    sys.exit(vm_main(sys.argv[1:], prog="python -m ublk_driver.testbed"))
