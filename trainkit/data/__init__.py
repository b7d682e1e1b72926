"""Datasets, preprocessing and batch sources. Import submodules directly (kept light so that
`trainkit predict` never pays for the training-side imports)."""
