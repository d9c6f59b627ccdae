"""segpipe's pipeline steps: each module here exposes one plain function over artifact paths.

`core/` holds the libraries the steps share (artifacts, data format, model, metrics, serving);
`tools/` holds the user tools behind CLI commands (demo data, importers, predict, report). Imports
run one way: steps and tools import `core`, never each other's internals.
"""
