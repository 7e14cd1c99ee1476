"""`gbif-embed explore` and `gbif-embed suspects`: a snapshot searched, mapped and checked.

records.py   what each row shows and is filtered by: the snapshot's columns, plus the
             export's occurrence fields (country, year, ranks) read once at build
layout.py    the 2-D map (PCA, then UMAP on a sample, the rest placed by neighbours)
index.py     the cache beside the snapshot (explore/), the faiss index, DuckDB filters
suspects.py  records whose pictures' neighbours carry another name
pictures.py  thumbnails, only by content hash (kept thumbnails, image store)
photos.py    an uploaded photo, embedded with the snapshot's own model
server.py    the FastAPI app: searches, filters, map, suspects, thumbnails
command.py   `gbif-embed explore` and `gbif-embed suspects`
static/      the page: HTML, CSS and a plain script (no library, works offline)
"""
