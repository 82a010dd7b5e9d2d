"""``python -m kvbm``: same as the ``kvbm`` command."""

from kvbm.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
