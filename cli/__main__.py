"""`python -m localmix.cli` runs the command line."""

from localmix.cli import main

main()
