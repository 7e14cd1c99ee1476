"""The explorer's web server (FastAPI on uvicorn): a page and a small JSON API.

Everything is read-only and local: the page and its script are files of
this package (no CDN, works offline), pictures come only by content hash
(pictures.py), uploads are embedded in memory and forgotten. Routes:

    GET  /                      the page          GET /static/app.js, /static/style.css
    GET  /api/info              snapshot, sizes, filter choices, what is missing
    GET  /api/search?q=&by=     by occurrence id or scientific name, with filters
    POST /api/photo             the request body is a photo; with filters
    GET  /api/record/{row}      a map point: its record and neighbours
    GET  /api/map               float32 x, y of every point (binary)
    GET  /api/colours?field=    a colour index per point and its legend
    GET  /api/suspects          the most suspect identifications
    GET  /suspects.csv          all of them, for publishers to review
    GET  /thumb/{sha256}        a picture's thumbnail
"""
from __future__ import annotations

import base64
import importlib.resources
from typing import Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from pipeline.tools.explore import suspects as suspect_list
from pipeline.tools.explore.index import Explorer, Filters
from pipeline.tools.explore.photos import Photos
from pipeline.tools.explore.pictures import SHA, Pictures
from pipeline.tools.explore.records import LICENCE_CLASSES, RANKS
from pipeline.tools.query import QueryError, occurrence_link

STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
SHOWN = ("row", "gbifID", "coreID", "occurrenceID", "scientificName", "taxonKey", "datasetKey",
         "country", "eventDate", "year", "license", "licence_class", "creator", "rightsHolder",
         "identifier", "image_sha256", *RANKS)
COLOUR_FIELDS = ("scientificName", *RANKS, "country", "year", "datasetKey", "licence_class")
TOP_COLOURS = 12
MAX_K = 100


def _static(name: str) -> str:
    return importlib.resources.files("pipeline.tools.explore").joinpath(
        "static", name).read_text(encoding="utf-8")


def create_app(explorer: Explorer, pictures: Pictures, photos: Photos) -> FastAPI:
    app = FastAPI(title="gbif-embed explore", docs_url=None, redoc_url=None,
                  openapi_url=None)
    colours: dict[str, dict] = {}

    def shown(rows: list[int], scores: Optional[list[float]] = None) -> list[dict]:
        out = []
        for i, record in enumerate(explorer.rows(rows)):
            row = {name: record.get(name) for name in SHOWN}
            row["link"] = occurrence_link(record)
            row["thumb"] = pictures.has(record.get("image_sha256"))
            if scores is not None:
                row["similarity"] = round(scores[i], 4)
            out.append(row)
        return out

    def neighbours(vector: np.ndarray, k: int, filters: Filters,
                   exclude: Optional[int] = None) -> list[dict]:
        found = explorer.search(vector, k, explorer.filter_mask(filters), exclude)
        return shown([r for r, _ in found], [s for _, s in found])

    def filters_of(request: Request) -> tuple[Filters, int]:
        p = request.query_params
        try:
            k = max(1, min(MAX_K, int(p.get("k") or 10)))
            filters = Filters(rank=p.get("rank") or None, taxon=p.get("taxon") or None,
                              country=p.get("country") or None,
                              year_from=int(p["year_from"]) if p.get("year_from") else None,
                              year_to=int(p["year_to"]) if p.get("year_to") else None,
                              dataset=p.get("dataset") or None, licence=p.get("licence") or None)
        except ValueError:
            raise QueryError("k, year_from and year_to must be whole numbers") from None
        return filters, k

    @app.exception_handler(QueryError)
    async def _query_error(_request, err: QueryError):
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(_static("index.html"))

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:  # a fixed list: no request names a file
            raise HTTPException(404)
        return Response(_static(name), media_type=STATIC[name])

    @app.get("/api/info")
    def info():
        countries = [r[0] for r in explorer.sql(
            "SELECT country FROM records WHERE country IS NOT NULL GROUP BY 1 ORDER BY 1"
        )]
        datasets = [{"key": r[0], "n": r[1]} for r in explorer.sql(
            "SELECT datasetKey, count(*) FROM records WHERE datasetKey IS NOT NULL GROUP BY 1 "
            "ORDER BY 2 DESC, 1 LIMIT 200")]
        years = explorer.sql("SELECT min(year), max(year) FROM records")[0]
        missing = list(pictures.missing())
        if explorer.info.get("export_fields_missing"):
            missing.append("no country, date or ranks: "
                           + explorer.info["export_fields_missing"])
        if photos.problem:
            missing.append(photos.problem)
        return {"snapshot": explorer.snapshot.name, "rows": explorer.size,
                "names": explorer.sql("SELECT count(DISTINCT scientificName) FROM records")[0][0],
                "ranks": explorer.info.get("ranks") or [], "countries": countries,
                "datasets": datasets, "years": list(years),
                "licences": list(LICENCE_CLASSES), "colour_fields": list(COLOUR_FIELDS),
                "model": {"uri": photos.model_uri, "status": photos.status},
                "max_upload_bytes": photos.max_bytes, "missing": missing}

    @app.get("/api/search")
    def search(request: Request):
        filters, k = filters_of(request)
        text = (request.query_params.get("q") or "").strip()
        by = request.query_params.get("by") or "auto"
        if not text:
            raise QueryError("type an occurrence id (gbifID or core id) or a scientific name")
        if by in ("id", "auto"):
            row = explorer.find_id(text)
            if row is not None:
                query = shown([row])[0]
                return {"query": query, "description": f"occurrence {text}",
                        "results": neighbours(explorer.vector(row), k, filters,
                                              explorer.rows([row])[0]["occurrence"])}
            if by == "id":
                raise QueryError(f"no occurrence {text!r} in {explorer.snapshot.name}")
        named = explorer.find_name(text)
        if named is None:
            raise QueryError(f"no occurrence id or scientific name {text!r} in "
                             f"{explorer.snapshot.name}")
        name, rows = named
        return {"query": {"scientificName": name, "count": len(rows)},
                "description": f"{name}: the pictures nearest to its {len(rows):,} pictures' "
                               "mean", "results": neighbours(explorer.centroid(rows), k, filters)}

    @app.post("/api/photo")
    async def photo(request: Request):
        filters, k = filters_of(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > photos.max_bytes:
            raise QueryError(f"the photo is too large: {int(declared):,} bytes, at most "
                             f"{photos.max_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > photos.max_bytes:
                raise QueryError(f"the photo is too large: over {photos.max_bytes:,} bytes")
        vector = photos.embed(bytes(body))
        return {"query": {"scientificName": "your photo"}, "description": "your photo",
                "results": neighbours(vector, k, filters)}

    @app.get("/api/record/{row}")
    def record(row: int, request: Request):
        if not 0 <= row < explorer.size:
            raise HTTPException(404)
        filters, k = filters_of(request)
        query = shown([row])[0]
        return {"query": query, "description": f"map point {row}",
                "results": neighbours(explorer.vector(row), k, filters,
                                      explorer.rows([row])[0]["occurrence"])}

    @app.get("/api/map")
    def map_points():
        xy = np.stack([explorer.records.column("x").to_numpy(),
                       explorer.records.column("y").to_numpy()], axis=1).astype("<f4")
        return Response(xy.tobytes(), media_type="application/octet-stream")

    @app.get("/api/colours")
    def colour(field: str = "scientificName"):
        if field not in COLOUR_FIELDS:
            raise QueryError(f"colour by one of {', '.join(COLOUR_FIELDS)}; found {field!r}")
        if field not in colours:
            colours[field] = _colours(explorer, field)
        return colours[field]

    @app.get("/api/suspects")
    def suspects(limit: int = 100):
        table = suspect_list.suspects(explorer)
        return {"total": table.num_rows,
                "rows": [dict(_plain(row), thumb=pictures.has(row.get("image_sha256")))
                         for row in suspect_list.rows_of(explorer, table, max(1, min(limit, 1000)))]}

    @app.get("/suspects.csv")
    def suspects_csv():
        table = suspect_list.suspects(explorer)
        return PlainTextResponse(
            suspect_list.to_csv(suspect_list.rows_of(explorer, table)), media_type="text/csv",
            headers={"Content-Disposition":
                     f'attachment; filename="suspects-{explorer.snapshot.name}.csv"'})

    @app.get("/thumb/{sha}")
    def thumb(sha: str):
        if not SHA.match(sha):
            raise HTTPException(404)
        data = pictures.thumbnail(sha)
        if data is None:
            raise HTTPException(404)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=86400, immutable"})

    return app


def _plain(row: dict) -> dict:
    return {k: (round(float(v), 4) if isinstance(v, (float, np.floating)) else v)
            for k, v in row.items() if k in (*SHOWN, "rank", "score", "suggested_name",
                                             "suggested_share", "own_name_share",
                                             "neighbours", "link")}


def _colours(explorer: Explorer, field: str) -> dict:
    """The commonest values get a colour each; the rest are "other", nulls "missing"."""
    top = [r[0] for r in explorer.sql(
        f'SELECT "{field}" FROM records WHERE "{field}" IS NOT NULL GROUP BY 1 '
        f"ORDER BY count(*) DESC, 1 LIMIT {TOP_COLOURS}")]
    values = explorer.records.column(field).to_pylist()
    at = {v: i for i, v in enumerate(top)}
    other, missing = len(top), len(top) + 1
    codes = np.array([missing if v is None else at.get(v, other) for v in values], np.uint8)
    counts = np.bincount(codes, minlength=missing + 1)
    legend = [{"label": str(v), "count": int(counts[i])} for i, v in enumerate(top)]
    legend += [{"label": "other", "count": int(counts[other])},
               {"label": "missing", "count": int(counts[missing])}]
    return {"field": field, "legend": legend,
            "codes": base64.b64encode(codes.tobytes()).decode()}
