"""``python -m kvbm``: same as the ``kvbm`` command."""

from kvbm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
