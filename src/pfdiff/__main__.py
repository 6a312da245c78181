"""``python -m pfdiff``: the same command line as the ``pfdiff`` script."""

from pfdiff.cli import app

if __name__ == "__main__":
    app(prog_name="pfdiff")
