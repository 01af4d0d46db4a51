"""`python -m aslora`: the command line."""

from aslora.cli import app

app()
