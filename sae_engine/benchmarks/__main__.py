"""``python -m sae_engine.benchmarks SUITE [options]``: the same as ``sae-engine bench``."""
import sys

from . import main

sys.exit(main())
