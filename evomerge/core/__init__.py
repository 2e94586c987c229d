"""Layer 0, imports nothing of evomerge: the error hierarchy, atomic file writes, process settings, the version."""
