"""One module per `emloc-stream` command; `stream/cli.py` builds the parser from them."""
