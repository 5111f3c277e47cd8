"""``python -m streams.cli``: the same as the ``pinfresh`` console script."""

from streams.cli import main

main()
