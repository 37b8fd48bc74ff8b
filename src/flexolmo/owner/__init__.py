"""A data owner's side: training an expert, its package and manifest, differential privacy, proxy documents."""
