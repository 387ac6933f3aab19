"""``python -m steerport.cli``: the same as the ``steerport`` command."""

from steerport.cli import run

run()
