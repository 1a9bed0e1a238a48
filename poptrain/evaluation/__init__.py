"""Held-out evaluation of the population: the coordinator's summary and ensemble, and the population average."""
