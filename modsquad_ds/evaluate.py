"""``python -m modsquad_ds.evaluate``: the evaluation command (see modsquad_ds/eval/__main__.py)."""

import sys

from modsquad_ds.eval.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
