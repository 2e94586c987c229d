"""Layer 7: where candidates are built and scored: in this process, or on Ray workers; Ray job submission."""

# how the sources reach Ray workers (execution/ray.py, execution/sources.py): `--sources`'s choices
SOURCES = ("path", "object_store")
