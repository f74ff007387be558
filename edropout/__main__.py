"""``python -m edropout ...``: the command line of the main job."""
import sys

from .app.cli import main

sys.exit(main())
