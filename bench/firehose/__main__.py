"""``python -m bench.firehose ...``: the same command as ``pgfleet firehose``."""

import typer

from .cli import firehose

if __name__ == "__main__":
    typer.run(firehose)
