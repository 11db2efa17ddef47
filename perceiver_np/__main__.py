"""``python -m perceiver_np``: the ``perceiver-np`` command (perceiver_np.cli)."""

from .cli import main

raise SystemExit(main())
