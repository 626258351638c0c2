"""Getting the deployed network out of a run: export formats, loading, preprocessing."""
