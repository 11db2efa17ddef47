"""``python -m perceiver_np``: the ``perceiver-np`` command (perceiver_np.cli)."""

from .cli import run

raise SystemExit(run())
