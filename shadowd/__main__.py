# `python -m shadowd`: the same as the `shadowd` console script.
#
# Must never: do anything that command does not (it is only main()).
import sys

from .cli import main

sys.exit(main())
