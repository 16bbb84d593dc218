"""The workshop: everything that runs beside the book, each piece its own command
(python -m workshop.NAME --help). It imports the book; the book never imports it, except
train.py's command line, which builds the built-in demo when no weights are given."""
