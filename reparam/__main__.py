"""``python -m reparam`` runs the ``reparam`` command."""

import sys

from .cli import main

sys.exit(main())
