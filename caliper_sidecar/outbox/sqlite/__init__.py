"""The outbox on one SQLite file: the embedded default, one `run` process per file."""
