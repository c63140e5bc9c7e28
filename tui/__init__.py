"""The Textual chat app (`localmix tui`)."""
