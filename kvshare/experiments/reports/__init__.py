"""Each notebook's figures (matplotlib) and report text (tables and conclusions in Markdown), computed from the
numbers its `kvshare.experiments` module produced: `reports/<name>.py` belongs to `experiments/<name>.py`.

This is the only part of kvshare that imports matplotlib. Importing any report selects the Agg backend first when
there is no display and no Jupyter kernel (papermill, CI), before a report module imports pyplot.
"""

import os
import sys

import matplotlib

if not os.environ.get("DISPLAY") and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
