"""User tools behind CLI commands: demo data, importers, predict, the run report."""
