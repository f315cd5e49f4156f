"""The write path: scan folders, decode images in workers, encode, write catalog + vectors, build the index.

Depends on the alignsearch core; the core never imports it.
"""
