"""The SGR accuracy study (``benchmarks/study_sgr.py``): models, variants, one run, the report."""
