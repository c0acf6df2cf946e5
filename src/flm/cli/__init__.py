"""The `flm` command line."""
