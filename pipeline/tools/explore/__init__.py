"""`gbif-embed explore` and `gbif-embed suspects`: a snapshot searched, mapped and checked.

records.py   what each row shows and is filtered by: the snapshot's columns, plus the
             export's occurrence fields (country, year, ranks) read once at build
layout.py    the 2-D map (PCA, then UMAP on a sample, the rest placed by neighbours)
index.py     the cache beside the snapshot (explore/) and the faiss index over it
suspects.py  records whose pictures' neighbours carry another name
server.py    the FastAPI page: searches, filters, map, suspects, thumbnails by hash
"""
