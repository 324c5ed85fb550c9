import sys

from ublk_driver.cli import main

sys.exit(main())
