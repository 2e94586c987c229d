"""Layer 8: a search in a run folder: the folder (log, lock, checkpoints), starting and resuming a search, staged searches, status, export, materialize, the progress display."""
