"""Training: the driver (`segnext train`), the per-worker loop and its parts."""
