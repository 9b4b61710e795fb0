"""Scores: protocols and folds (splits, with lomo registered by its own module), aggregation
image -> well -> treatment, metrics, conformal prediction and novelty."""
