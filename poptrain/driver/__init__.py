"""The run: checks before anything starts, placement, starting and watching hosts, restarts, and the end."""
