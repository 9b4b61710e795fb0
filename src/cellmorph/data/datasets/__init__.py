"""One module per dataset: its loader (-> ImageTable), download and raw-plate preparation, each a
registration in cellmorph.data.registry; cellmorph.data.catalog imports them all."""
