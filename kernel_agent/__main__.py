"""``python -m kernel_agent ...`` = ``ublkml agent ...``."""

import sys

from ublk_driver.core.cli import main

sys.exit(main(["agent", *sys.argv[1:]]))
