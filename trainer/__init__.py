"""Trainer side of memstore: Engram hashing, the Engram module and the training loop that
fetches table rows from the store."""
