"""Compare the runs of a pegrid sweep: load run records (local dirs or W&B) into tidy tables, then write
figures (PNG + PDF), final-metrics tables (Markdown + CSV) and one report.md. Entry point: analysis/compare.py.
"""
