# `python -m shadowd`: the same as the `shadowd` console script.
import sys

from .cli import main

sys.exit(main())
