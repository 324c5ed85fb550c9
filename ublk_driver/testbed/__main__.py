"""``python -m ublk_driver.testbed provision|run|info`` = ``ublkml vm ...``."""

import sys

from ublk_driver.core.cli import main

sys.exit(main(["vm", *sys.argv[1:]]))
