"""`python -m flax_registry`: the `flax-registry` command line (see `flax_registry.cli`)."""

import sys

from .cli import main

sys.exit(main())
