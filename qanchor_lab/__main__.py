"""`python -m qanchor_lab ...` runs the command-line interface (see cli.py)."""

from qanchor_lab.cli import main

raise SystemExit(main())
