"""Experiments: one module per paper section; they compose library calls and write reports."""
