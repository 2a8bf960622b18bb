"""The `segnext eval`, `predict`, `export` and `demo` commands."""
