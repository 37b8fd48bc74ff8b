"""The demo and its baselines, compute accounting and the report."""
