"""Everything MLflow: the population's runs, batched metric writes, logged models, plots, and `poptrain compare`."""
