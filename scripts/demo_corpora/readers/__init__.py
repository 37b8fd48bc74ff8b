"""One module per domain: the readers of its sources, each returning a list of document texts."""
