import sys

from .app.cli import run

sys.exit(run())
