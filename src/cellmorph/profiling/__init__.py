"""Image-based profiling: embeddings (embed), profile tables (tables), recipes (recipes, pycytominer),
similarity and retrieval metrics (similarity: NSC, NSCB, copairs mAP), and their evaluation (evaluate)."""
