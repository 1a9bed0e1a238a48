"""The coordinator: the barrier, the couplings evaluated on the population's values, and the actor that serves hosts."""
