"""Helpers the book needs, below it: file readers that name the failing file, the checkpoint
formats, METEOR 1.5 and PTB tokenisation as the official scoring runs them, the run's signals and
log, and the low-memory AdamW (train.py --low-memory). Nothing here imports the book."""
