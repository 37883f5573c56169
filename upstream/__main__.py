"""Entry point for ``python -m upstream``; all behaviour lives in :mod:`upstream.cli`."""

from upstream.cli import main

raise SystemExit(main())
