"""Compare the runs of a pegrid sweep: load run records (local dirs or W&B) into tidy tables, then write
figures (PNG + PDF), the paper tables (Markdown + LaTeX + CSV), reference tables (Markdown + CSV) and one
report.md with the set-up. Entry point: `python -m analysis.compare`.
"""
