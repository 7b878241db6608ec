"""`python -m saelab ...`: the same CLI as the `saelab` script."""

from saelab.cli import app

if __name__ == "__main__":
    app(prog_name="saelab")
