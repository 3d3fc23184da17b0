"""Tools that are not the running service: the fake TimeBack, the demo, its samples, and the
`validate` command."""
