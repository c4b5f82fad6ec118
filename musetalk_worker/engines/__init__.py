"""The lip-sync engines: each model family in a subpackage of its own."""
