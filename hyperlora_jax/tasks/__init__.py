"""Tasks built on the library: what a model, its data and its loss are (the round knows none)."""
