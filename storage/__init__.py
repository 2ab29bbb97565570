"""The storage boundary: the LMDB store and the archive files."""
