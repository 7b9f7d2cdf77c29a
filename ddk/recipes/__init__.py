"""Runnable end-to-end programs built from the DDK components."""
