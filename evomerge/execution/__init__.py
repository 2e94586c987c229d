"""Layer 7: where candidates are built and scored: in this process, or on Ray workers; Ray job submission."""
