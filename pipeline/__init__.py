"""The segpipe pipeline: configuration, the DAG declared once, its runners and the CLI."""
