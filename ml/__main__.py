"""``python -m ml model ...`` and ``python -m ml detect|train|synth|smart ...``."""

import sys

from ml.cli import main

sys.exit(main())
