"""A member's parts built from its config: model, datasets, optimizer, loss, terms, metrics, and the batches drawn from the data."""
