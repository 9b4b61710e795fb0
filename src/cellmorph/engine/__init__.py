"""The one runner: plan (validated before anything is written), folds here or on Ray, the run folder,
the final model, sweeps."""
