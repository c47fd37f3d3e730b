"""``python -m zupatch``: the same as the ``zupatch`` command."""

from zupatch.cli.main import main

main()
