"""``python -m qflare.cli``: the same as the ``qflare`` console script."""

from qflare.cli import main

main()
