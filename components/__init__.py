"""segpipe pipeline components: each module exposes one plain function over artifact paths."""
