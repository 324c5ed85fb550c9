"""``python -m ublk_driver ARGV...`` = ``ublkml ARGV...``."""

import sys

from ublk_driver.core.cli import main

sys.exit(main())
