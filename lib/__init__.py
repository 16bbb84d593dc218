"""Helpers the book needs, below it: file readers that name the failing file, the checkpoint
formats, METEOR 1.5 and PTB tokenisation as the official scoring runs them. Nothing here imports
the book."""
