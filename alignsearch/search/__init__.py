"""Search: answering a query over an index. The Python API and its snapshot reader (engine), what a valid query
is (querycheck), the filter language and its in-memory columns (filters, columns), compound-query fusion (query)
and duplicate groups (dupes). Imports encoders, storage and media; the indexer never imports it.
"""
