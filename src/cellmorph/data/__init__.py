"""Images in: dataset tables (ImageTable), the dataset registry and catalogue, pixel preprocessing, the
uint8 image store and raw-plate preparation. Imports only the bottom layer (config, errors, io, storage,
progress)."""
