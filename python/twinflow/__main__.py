"""``python -m twinflow ...`` — same as the ``twinflow`` console script."""

from twinflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
