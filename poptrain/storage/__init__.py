"""What a run keeps on disk: member checkpoints, coupling state, PBT events, the run record, all written atomically."""
