"""Assets: the per-slide stages, the patient stage and the catalog."""
