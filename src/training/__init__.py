"""The training loop and what it needs: optimiser and schedule, DDP, FLOPs/MFU, run record, loggers."""
