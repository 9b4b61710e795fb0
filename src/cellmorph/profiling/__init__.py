"""Image-based profiling: embeddings, profile tables, recipes (pycytominer), similarity and retrieval
metrics (NSC, NSCB, copairs mAP)."""
