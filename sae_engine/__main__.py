"""``python -m sae_engine ...`` (and ``torchrun -m sae_engine ...``) runs the ``sae-engine`` command line."""
from .cli import main

raise SystemExit(main())
