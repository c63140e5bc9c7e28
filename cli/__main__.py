"""`python -m localmix.cli` runs the command line."""

from localmix.cli.main import app

app(prog_name="localmix")
