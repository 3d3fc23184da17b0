"""The outbox on PostgreSQL: one database shared by any number of `run` replicas."""
