"""The embedding store and what reads it: exact and ANN search, near-duplicates, clustering."""
