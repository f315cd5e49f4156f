"""Storage: what an index holds on disk and how it is found.

Where an index lives and whom to trust (paths), the SQLite catalog and its keyword tables (catalog, keywords), the
fp16 vector segments (vectors), the FAISS index and its layouts on disk (ann; layout, layouts, shards) and the
export of all of it. Built on the two file primitives at the package root: `atomic` (every write) and `safeopen`
(every read of a user file).
Imports nothing above it: no encoder, no engine.
"""
