"""Synthetic GBIF occurrence downloads and pictures, for the demo, tests and benchmarks.

Nothing here is copied from a real download: every value, picture and file is
generated. What *is* copied is GBIF's layout (checked against real DwC-A
downloads from 2020 and 2021), because the reader has to cope with exactly that:

* `meta.xml` without an XML declaration, GBIF's attributes
  (`fieldsTerminatedBy="\\t" ... fieldsEnclosedBy="" ignoreHeaderLines="1"`),
  full term URIs, `<id index="0" />` / `<coreid index="0" />`, and extensions
  in an order that differs between downloads;
* tab-separated files with a header row, `\\n` line ends, no quoting (tabs and
  newlines in values become spaces; a bare `"` stays as it is);
* `metadata.xml` (EML, `packageId` = DOI, `alternateIdentifier` = download key),
  `citations.txt`, `rights.txt` (leading blank line, no final newline) and one
  `dataset/<datasetKey>.xml` per constituent dataset;
* Danish Mycological Society (Svampeatlas) media rows: empty `license`,
  `creator` = `rightsHolder` = the photographer, `<YYYY>-<obsId>_<id>.JPG` names.

Everything is deterministic: the same arguments give the same bytes, so tests
can compare outputs and benchmarks can be repeated.
"""
from __future__ import annotations

import dataclasses
import io
import os
import random
import re
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DC = "http://purl.org/dc/terms/"
DWC = "http://rs.tdwg.org/dwc/terms/"
GBIF = "http://rs.gbif.org/terms/1.0/"
OCCURRENCE_ROW_TYPE = DWC + "Occurrence"
MULTIMEDIA_ROW_TYPE = GBIF + "Multimedia"

DMS_DATASET_KEY = "84d26682-f762-11e1-a439-00145eb45e9a"
CC_BY_NC_URL = "http://creativecommons.org/licenses/by-nc/4.0/"

# The attributes every modern GBIF download writes on <core> and <extension>.
GBIF_FILE_ATTRIBUTES = ('encoding="UTF-8" fieldsTerminatedBy="\\t" linesTerminatedBy="\\n" '
                        'fieldsEnclosedBy="" ignoreHeaderLines="1"')


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------

@dataclass
class Occurrence:
    """One row of occurrence.txt (the interpreted core), a subset of GBIF's 241 columns."""
    gbifID: int
    occurrenceID: str
    datasetKey: str
    taxonKey: Optional[int]
    scientificName: str
    license: str = "CC_BY_NC_4_0"          # interpreted licence: GBIF's enum, not a URL
    rightsHolder: str = ""
    basisOfRecord: str = "HUMAN_OBSERVATION"
    recordedBy: str = ""
    eventDate: str = ""
    countryCode: str = "DK"
    locality: str = ""
    decimalLatitude: Optional[float] = None
    decimalLongitude: Optional[float] = None
    kingdom: str = "Fungi"
    phylum: str = "Basidiomycota"
    family: str = ""
    genus: str = ""
    taxonRank: str = "SPECIES"
    publishingCountry: str = "DK"
    mediaType: str = ""                    # e.g. "StillImage" or "StillImage;Sound"
    species: str = ""


@dataclass
class Media:
    """One row of multimedia.txt. `gbifID` may be a str so tests can inject ' 123 ' or garbage."""
    gbifID: Union[int, str]
    identifier: str
    type: str = "StillImage"
    format: str = "image/jpeg"
    references: str = ""
    title: str = ""
    description: str = ""
    source: str = ""
    audience: str = ""
    created: str = ""
    creator: str = ""
    contributor: str = ""
    publisher: str = ""
    license: str = ""
    rightsHolder: str = ""


# (column, term URI) in GBIF's order: dc terms, then dwc terms, then gbif terms.
OCCURRENCE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("gbifID", GBIF), ("license", DC), ("rightsHolder", DC), ("basisOfRecord", DWC),
    ("occurrenceID", DWC), ("recordedBy", DWC), ("eventDate", DWC), ("countryCode", DWC),
    ("locality", DWC), ("decimalLatitude", DWC), ("decimalLongitude", DWC),
    ("scientificName", DWC), ("kingdom", DWC), ("phylum", DWC), ("family", DWC),
    ("genus", DWC), ("taxonRank", DWC), ("datasetKey", GBIF), ("publishingCountry", GBIF),
    ("mediaType", GBIF), ("taxonKey", GBIF), ("species", GBIF),
)

# verbatim.txt holds what the publisher sent; associatedMedia exists only here.
VERBATIM_COLUMNS: tuple[tuple[str, str], ...] = (
    ("gbifID", GBIF), ("license", DC), ("rightsHolder", DC), ("basisOfRecord", DWC),
    ("occurrenceID", DWC), ("recordedBy", DWC), ("associatedMedia", DWC), ("eventDate", DWC),
    ("countryCode", DWC), ("locality", DWC), ("decimalLatitude", DWC),
    ("decimalLongitude", DWC), ("scientificName", DWC),
)

# The 15 columns of every GBIF multimedia.txt, in GBIF's order.
MULTIMEDIA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("gbifID", GBIF), ("type", DC), ("format", DC), ("identifier", DC), ("references", DC),
    ("title", DC), ("description", DC), ("source", DC), ("audience", DC), ("created", DC),
    ("creator", DC), ("contributor", DC), ("publisher", DC), ("license", DC),
    ("rightsHolder", DC),
)


# --------------------------------------------------------------------------
# Species and pictures
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Fungus:
    """A real Danish fungus and how its synthetic pictures look.

    taxonKeys are plausible 7-digit GBIF backbone-style keys, not looked up.
    """
    scientificName: str
    taxonKey: int
    family: str
    cap: tuple[int, int, int]
    stem: tuple[int, int, int]
    shape: str          # convex | conical | funnel | flat
    habitat: str        # key of HABITATS: the species' usual ground
    spots: bool = False
    stem_ratio: float = 0.8   # stem length / cap width

    @property
    def genus(self) -> str:
        return self.scientificName.split()[0]

    @property
    def species(self) -> str:
        return " ".join(self.scientificName.split()[:2])


FUNGI: tuple[Fungus, ...] = (
    Fungus("Amanita muscaria (L.) Lam., 1783", 5248454, "Amanitaceae",
           (205, 35, 25), (238, 234, 220), "convex", "moss", spots=True, stem_ratio=1.0),
    Fungus("Boletus edulis Bull.", 5249527, "Boletaceae",
           (120, 75, 40), (220, 205, 170), "convex", "needles", stem_ratio=0.7),
    Fungus("Cantharellus cibarius Fr.", 5249555, "Cantharellaceae",
           (240, 170, 30), (240, 180, 50), "funnel", "moss", stem_ratio=0.5),
    Fungus("Clitocybe nebularis (Batsch) P.Kumm.", 2524491, "Tricholomataceae",
           (150, 145, 135), (215, 210, 200), "flat", "leaf_litter", stem_ratio=0.6),
    Fungus("Psilocybe semilanceata (Fr.) P.Kumm.", 2575283, "Hymenogastraceae",
           (175, 140, 80), (200, 180, 140), "conical", "grass", stem_ratio=2.2),
    Fungus("Hypholoma fasciculare (Huds.) P.Kumm.", 2539393, "Strophariaceae",
           (220, 200, 50), (210, 190, 70), "convex", "wood", stem_ratio=1.1),
    Fungus("Russula ochroleuca (Pers.) Fr.", 2534072, "Russulaceae",
           (215, 180, 60), (245, 242, 235), "flat", "leaf_litter", stem_ratio=0.7),
    Fungus("Laccaria amethystina Cooke", 2528870, "Hydnangiaceae",
           (130, 70, 160), (140, 85, 165), "flat", "leaf_litter", stem_ratio=1.2),
    Fungus("Coprinus comatus (O.F.Müll.) Pers.", 2535891, "Agaricaceae",
           (235, 232, 222), (245, 243, 238), "conical", "grass", stem_ratio=1.0),
    Fungus("Mycena galericulata (Scop.) Gray", 2525232, "Mycenaceae",
           (140, 115, 95), (175, 160, 145), "conical", "wood", stem_ratio=1.8),
)

# Forest-floor palettes (RGB) for the background, one per kind of ground.
HABITATS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "moss": ((60, 95, 35), (85, 120, 45), (45, 70, 30), (105, 125, 55)),
    "needles": ((110, 70, 40), (140, 95, 55), (80, 55, 35), (95, 85, 50)),
    "leaf_litter": ((150, 95, 45), (120, 75, 35), (175, 125, 60), (90, 60, 35)),
    "grass": ((95, 140, 50), (125, 160, 65), (75, 115, 40), (150, 160, 80)),
    "wood": ((70, 55, 40), (95, 80, 60), (50, 42, 35), (110, 100, 80)),
}


def fungus(species: int) -> Fungus:
    """The style of species index `species`: FUNGI for known ones, else a seeded made-up one.

    Indexes past FUNGI still give a stable look so benchmarks can ask for many classes.
    """
    if 0 <= species < len(FUNGI):
        return FUNGI[species]
    r = random.Random(species)
    rgb = lambda: (r.randrange(40, 250), r.randrange(30, 230), r.randrange(20, 220))  # noqa: E731
    return Fungus(f"Fungus syntheticus{species} Synth.", 9_000_000 + species, "Synthaceae",
                  rgb(), rgb(), r.choice(["convex", "conical", "funnel", "flat"]),
                  r.choice(sorted(HABITATS)), r.random() < 0.2, r.uniform(0.5, 2.0))


def _jitter(rgb: Iterable[int], rng: np.random.Generator, sd: float) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(c + rng.normal(0, sd), 0, 255)) for c in rgb)
    return r, g, b


def synthetic_photo(seed: int, species: int = 0, size: tuple[int, int] = (800, 600)) -> Image.Image:
    """A deterministic fungus-like RGB picture: forest floor, a cap, a stem, texture and noise.

    Pictures of one `species` share cap colour, cap shape and ground, so that an
    embedding model (or a pixel distance) finds them alike; `seed` varies the
    position, scale, lighting, debris and noise. Pure numpy + Pillow drawing, so
    the pixels are the same on every machine.
    """
    w, h = size
    style = fungus(species)
    rng = np.random.default_rng([abs(seed), abs(species), 0x5EED])
    palette = np.array(HABITATS[style.habitat], dtype=np.float64)

    # Ground: a coarse patchwork of the habitat's colours, smoothly upscaled.
    gh, gw = 9, 12
    coarse = palette[rng.integers(0, len(palette), (gh, gw))] + rng.normal(0, 10, (gh, gw, 3))
    img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB").resize(
        (w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    scale = min(w, h)

    # Debris: leaves, needles, twigs in the ground's colours.
    for _ in range(int(rng.integers(25, 45))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.01, 0.05) * scale, rng.uniform(0.005, 0.03) * scale
        colour = _jitter(palette[rng.integers(0, len(palette))] * rng.uniform(0.7, 1.3), rng, 8)
        if rng.random() < 0.3:
            draw.line((x, y, x + rng.normal(0, rx * 3), y + rng.normal(0, rx)), fill=colour,
                      width=max(1, int(ry / 3)))
        else:
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=colour)

    # The fruit body: stem first, cap over it.
    cw = rng.uniform(0.22, 0.42) * scale            # cap width
    ch = cw * {"convex": 0.45, "conical": 0.6, "funnel": 0.3, "flat": 0.18}[style.shape]
    cx = rng.uniform(0.3, 0.7) * w
    base = rng.uniform(0.35, 0.55) * h              # y of the cap's lower edge
    sw = cw * (0.12 if style.shape == "conical" else 0.2)
    sl = min(cw * style.stem_ratio, h - base - 2)
    lean = rng.normal(0, 0.08) * sl
    stem_rgb = _jitter(style.stem, rng, 6)
    draw.polygon([(cx - sw / 2, base), (cx + sw / 2, base),
                  (cx + sw * 0.6 + lean, base + sl), (cx - sw * 0.6 + lean, base + sl)],
                 fill=stem_rgb)
    cap_rgb = _jitter(style.cap, rng, 8)
    shade = tuple(int(c * 0.7) for c in cap_rgb)
    light = tuple(min(255, int(c * 1.25 + 20)) for c in cap_rgb)
    box = (cx - cw / 2, base - ch, cx + cw / 2, base + ch)
    if style.shape == "convex":
        draw.chord(box, 180, 360, fill=cap_rgb)
        draw.line((cx - cw / 2, base, cx + cw / 2, base), fill=shade, width=max(1, int(ch / 8)))
    elif style.shape == "conical":
        draw.polygon([(cx - cw / 2, base), (cx - cw / 8, base - ch * 1.5),
                      (cx + cw / 8, base - ch * 1.5), (cx + cw / 2, base)], fill=cap_rgb)
        draw.ellipse((cx - cw / 8, base - ch * 1.6, cx + cw / 8, base - ch * 1.4), fill=cap_rgb)
    elif style.shape == "funnel":
        draw.polygon([(cx - cw / 2, base - ch), (cx + cw / 2, base - ch),
                      (cx + sw / 2, base + ch), (cx - sw / 2, base + ch)], fill=shade)
        draw.ellipse((cx - cw / 2, base - ch * 1.4, cx + cw / 2, base - ch * 0.6), fill=cap_rgb)
    else:  # flat
        draw.ellipse((cx - cw / 2, base - ch, cx + cw / 2, base + ch * 0.5), fill=cap_rgb)
        draw.ellipse((cx - cw / 8, base - ch * 1.2, cx + cw / 8, base - ch * 0.4), fill=shade)
    # A highlight where the light falls, and Amanita-style spots.
    draw.ellipse((cx - cw * 0.3, base - ch * 0.9, cx - cw * 0.05, base - ch * 0.6), fill=light)
    if style.spots:
        for _ in range(int(rng.integers(6, 14))):
            sx, sy = cx + rng.uniform(-0.35, 0.35) * cw, base - rng.uniform(0.15, 0.8) * ch
            r = rng.uniform(0.015, 0.04) * cw
            draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(240, 236, 225))

    # Camera: slight blur, directional light, sensor noise.
    img = img.filter(ImageFilter.GaussianBlur(radius=max(0.5, scale / 600)))
    arr = np.array(img, dtype=np.float32)
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    angle, slope = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.35)
    light = rng.uniform(0.8, 1.15) + (xs * np.cos(angle) + ys * np.sin(angle)) * slope
    arr *= light.astype(np.float32)[..., None]
    arr += 5 * rng.standard_normal(arr.shape, dtype=np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image, quality: int = 88,
               exif_orientation: Optional[int] = None) -> bytes:
    """JPEG-encode `image` (RGB or L kept as is, other modes made RGB).

    `exif_orientation` (1-8) writes an EXIF Orientation tag, as phone cameras
    do instead of rotating pixels, so orientation handling can be tested.
    """
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    kwargs = {}
    if exif_orientation is not None:
        if not 1 <= exif_orientation <= 8:
            raise ValueError(f"EXIF orientation must be 1-8, not {exif_orientation}")
        exif = Image.Exif()
        exif[0x0112] = exif_orientation   # Orientation
        kwargs["exif"] = exif.tobytes()
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------
# The Darwin Core Archive
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    """What GBIF says about a constituent dataset in citations.txt, rights.txt and dataset/*.xml."""
    title: str
    publisher: str
    doi: str
    rights_url: str
    rights_title: str
    authors: str


DATASETS: dict[str, DatasetInfo] = {
    DMS_DATASET_KEY: DatasetInfo(
        "Danish Mycological Society, fungal records database", "Danish Mycological Society",
        "10.15468/zn159h", "http://creativecommons.org/licenses/by-nc/4.0/legalcode",
        "Creative Commons Attribution Non Commercial (CC-BY-NC) 4.0 License",
        "Frøslev T G, Heilmann-Clausen J, Lange C, Læssøe T, Petersen J H, Søchting U, "
        "Jeppesen T S, Vesterholt J"),
}


def dataset_info(key: str) -> DatasetInfo:
    """Known datasets from DATASETS; any other key gets a made-up CC BY 4.0 one."""
    return DATASETS.get(key) or DatasetInfo(
        f"Synthetic dataset {key[:8]}", "gbif-embed test suite", f"10.15468/synth-{key[:8]}",
        "http://creativecommons.org/licenses/by/4.0/legalcode",
        "Creative Commons Attribution (CC-BY) 4.0 License", "Test Suite G")


def _date_of(download_key: str) -> str:
    """The date in a key like 0022697-200613084148143 (yyMMdd after the dash), else a fixed one."""
    m = re.fullmatch(r"\d+-(\d\d)(\d\d)(\d\d)\d*", download_key)
    return f"20{m[1]}-{m[2]}-{m[3]}" if m else "2026-11-26"


def _cell(value: object) -> str:
    """A value as GBIF writes it: None empty, tabs and line breaks turned into spaces."""
    if value is None:
        return ""
    return re.sub(r"[\t\r\n]", " ", str(value))


def _table(columns: tuple[tuple[str, str], ...], rows: Iterable[dict]) -> str:
    lines = ["\t".join(name for name, _ in columns)]
    lines += ["\t".join(_cell(row.get(name)) for name, _ in columns) for row in rows]
    return "\n".join(lines) + "\n"


def _meta_block(tag: str, location: str, row_type: str, id_tag: str,
                columns: tuple[tuple[str, str], ...]) -> list[str]:
    lines = [f'  <{tag} {GBIF_FILE_ATTRIBUTES} rowType="{row_type}">',
             "    <files>", f"      <location>{location}</location>", "    </files>",
             f'    <{id_tag} index="0" />']
    lines += [f'    <field index="{i}" term="{ns}{name}"/>' for i, (name, ns) in enumerate(columns)]
    return lines + [f"  </{tag}>"]


def meta_xml(extensions: Iterable[str]) -> str:
    """GBIF's meta.xml for the core plus `extensions` ("verbatim", "multimedia") in that order."""
    blocks = {
        "verbatim": ("verbatim.txt", OCCURRENCE_ROW_TYPE, VERBATIM_COLUMNS),
        "multimedia": ("multimedia.txt", MULTIMEDIA_ROW_TYPE, MULTIMEDIA_COLUMNS),
    }
    lines = ['<archive xmlns="http://rs.tdwg.org/dwc/text/" metadata="metadata.xml">']
    lines += _meta_block("core", "occurrence.txt", OCCURRENCE_ROW_TYPE, "id", OCCURRENCE_COLUMNS)
    for name in extensions:
        location, row_type, columns = blocks[name]
        lines += _meta_block("extension", location, row_type, "coreid", columns)
    return "\n".join(lines + ["</archive>"]) + "\n"


_EML_HEAD = """<?xml version="1.0" encoding="utf-8"?>
<eml:eml xmlns:eml="eml://ecoinformatics.org/eml-2.1.1" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="eml://ecoinformatics.org/eml-2.1.1 http://rs.gbif.org/schema/eml-gbif-profile/1.1/eml.xsd"
        packageId={package_id}  system="http://gbif.org" scope="system"
  xml:lang="en">
"""

_GBIF_PERSON = """    <individualName>
          <surName>GBIF Download Service</surName>
    </individualName>
<electronicMailAddress>support@gbif.org</electronicMailAddress>"""


def _additional_metadata(date: str, citation: str, citation_id: str, object_name: str,
                         download_key: str) -> str:
    ident = f" identifier={quoteattr(citation_id)}" if citation_id else ""
    return f"""<additionalMetadata>
    <metadata>
      <gbif>
        <dateStamp>{date}T00:00:00Z</dateStamp>
      <citation{ident}>{escape(citation)}</citation>
              <physical>
                  <objectName>{object_name}</objectName>
                  <characterEncoding>UTF-8</characterEncoding>
                  <dataFormat>
                      <externallyDefinedFormat>
                          <formatName>Darwin Core Archive</formatName>
                      </externallyDefinedFormat>
                  </dataFormat>
                  <distribution>
                      <online>
                          <url function="download">http://api.gbif.org/v1/occurrence/download/request/{download_key}.zip</url>
                      </online>
                  </distribution>
              </physical>
        </gbif>
    </metadata>
</additionalMetadata>

</eml:eml>
"""


def metadata_xml(download_key: str, doi: str, counts: dict[str, int]) -> str:
    """The download's EML, shaped like GBIF's: packageId = DOI, alternateIdentifier = key."""
    date = _date_of(download_key)
    keys = ", ".join(f"&quot;is {escape(dataset_info(k).title)}&quot;" for k in counts)
    query = f"  &quot;DatasetKey&quot; : [ {keys} ]"
    per_dataset = "".join(f"{n} records from {escape(dataset_info(k).title)}\n"
                          for k, n in sorted(counts.items(), key=lambda kv: (kv[1], kv[0])))
    title = f"GBIF Occurrence Download {doi}"
    return _EML_HEAD.format(package_id=quoteattr(doi)) + f"""
<dataset>
        <alternateIdentifier>{escape(download_key)}</alternateIdentifier>
    <title>{escape(title)}</title>
    <creator>
{_GBIF_PERSON}    </creator>
    <metadataProvider>
{_GBIF_PERSON}    </metadataProvider>
      <pubDate>
      {date}
      </pubDate>
    <language>ENGLISH</language>
    <abstract>
        <para>A dataset containing all occurrences available in GBIF matching the query:
{{
{query}
}}
The dataset includes records from the following constituent datasets. The full metadata for each constituent is also included in this archive:
{per_dataset}</para>
    </abstract>
      <contact>
{_GBIF_PERSON}      </contact>

</dataset>

""" + _additional_metadata(date, title, doi, "Darwin Core Archive", download_key)


def _citation(key: str, date: str) -> str:
    info = dataset_info(key)
    return (f"{info.authors} ({date[:4]}). {info.title}. {info.publisher}. Occurrence dataset "
            f"https://doi.org/{info.doi} accessed via GBIF.org on {date}.")


def dataset_xml(key: str, download_key: str) -> str:
    """dataset/<key>.xml: the constituent dataset's EML, as GBIF copies it into the download."""
    info, date = dataset_info(key), _date_of(download_key)
    return _EML_HEAD.format(package_id=quoteattr(key)) + f"""
<dataset>
      <alternateIdentifier>{escape(info.doi)}</alternateIdentifier>
    <title>{escape(info.title)}</title>
    <language>ENGLISH</language>
    <abstract>
        <para>{escape(info.title)} (synthetic metadata generated by gbif-embed's test suite)</para>
    </abstract>
      <intellectualRights>
        <para>This work is licensed under a <ulink url={quoteattr(info.rights_url)}><citetitle>{escape(info.rights_title)}</citetitle></ulink>.</para>
      </intellectualRights>
      <contact>
    <individualName>
          <surName>{escape(info.publisher)}</surName>
    </individualName>
      </contact>

</dataset>

""" + _additional_metadata(date, _citation(key, date), "", "GBIF Occurrence Download",
                           download_key)


def _row(obj: object) -> dict:
    return dataclasses.asdict(obj)  # type: ignore[call-overload]


def _verbatim_row(occ: Occurrence, associated_media: str) -> dict:
    """What the publisher sent: licence URL, camel-case basisOfRecord, associatedMedia."""
    row = _row(occ)
    row["license"] = dataset_info(occ.datasetKey).rights_url
    row["basisOfRecord"] = "HumanObservation"
    row["associatedMedia"] = associated_media
    return row


def write_dwca(dest: str, occurrences: list[Occurrence], media: list[Media], *,
               as_zip: bool = True,
               download_key: str = "0000001-261126000000000",
               doi: str = "10.15468/dl.synth1",
               extension_order: tuple[str, ...] = ("verbatim", "multimedia"),
               verbatim_associated_media: Optional[dict[int, str]] = None,
               include_multimedia: bool = True,
               extra_multimedia_lines: Optional[list[str]] = None) -> str:
    """Write a DwC-A in GBIF's download layout to `dest` (a .zip path, or a folder when not as_zip).

    `extension_order` names the extensions to write, in their meta.xml order
    (GBIF's order differs between downloads; readers must parse meta.xml).
    `include_multimedia=False` drops multimedia.txt and its meta.xml entry, as
    in downloads without media. `extra_multimedia_lines` are appended raw to
    multimedia.txt (for ragged or garbage rows). Zip members are flat at the
    root plus dataset/, with fixed timestamps so the bytes are reproducible.
    Returns dest.
    """
    unknown = set(extension_order) - {"verbatim", "multimedia"}
    if unknown:
        raise ValueError(f"unknown extensions {sorted(unknown)}")
    extensions = [e for e in extension_order if include_multimedia or e != "multimedia"]
    associated = verbatim_associated_media or {}
    date = _date_of(download_key)
    counts: dict[str, int] = {}
    for occ in occurrences:
        counts[occ.datasetKey] = counts.get(occ.datasetKey, 0) + 1

    files: dict[str, str] = {"meta.xml": meta_xml(extensions),
                             "metadata.xml": metadata_xml(download_key, doi, counts)}
    files["occurrence.txt"] = _table(OCCURRENCE_COLUMNS, map(_row, occurrences))
    if "verbatim" in extensions:
        files["verbatim.txt"] = _table(VERBATIM_COLUMNS, (
            _verbatim_row(o, associated.get(o.gbifID, "")) for o in occurrences))
    if "multimedia" in extensions:
        text = _table(MULTIMEDIA_COLUMNS, map(_row, media))
        text += "".join(line if line.endswith("\n") else line + "\n"
                        for line in extra_multimedia_lines or [])
        files["multimedia.txt"] = text
    files["citations.txt"] = (
        "When using this dataset please use the following citation and pay attention to the "
        "rights documented in rights.txt:\n" + "".join(_citation(k, date) + "\n" for k in counts))
    files["rights.txt"] = "\n" + "\n".join(
        f"Dataset: {dataset_info(k).title}\nRights as supplied: {dataset_info(k).rights_url}"
        for k in counts)
    for key in counts:
        files[f"dataset/{key}.xml"] = dataset_xml(key, download_key)

    if as_zip:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        stamp = tuple(int(p) for p in date.split("-")) + (0, 0, 0)
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, text in files.items():
                info = zipfile.ZipInfo(name, date_time=stamp)  # type: ignore[arg-type]
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, text.encode("utf-8"))
    else:
        for name, text in files.items():
            path = os.path.join(dest, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
    return dest


# --------------------------------------------------------------------------
# A whole sample: export + pictures + what the pipeline should make of them
# --------------------------------------------------------------------------

@dataclass
class Sample:
    """A generated download, its pictures, and the outcome the pipeline should report."""
    export: str
    images_dir: str
    occurrences: list[Occurrence]
    media: list[Media]
    expected_images: int                 # media rows that should end as embeddings
    expected_failures: dict[str, str]    # identifier -> failure reason code
    expected_skips: dict[str, int]       # skip reason -> number of rows
    download_key: str = "0000001-261126000000000"
    doi: str = "10.15468/dl.synth1"
    good_identifiers: list[str] = field(default_factory=list)  # the expected_images rows


PHOTOGRAPHERS = ("Mette Sørensen", "Jens Holm", "Karin Bech", "Søren Lund", "Ida Mølgaard",
                 "Anders Kjær", "Birte Nørgaard")
# (locality, latitude, longitude): Danish woods and commons, coordinates approximate.
LOCALITIES = (("Rold Skov", 56.80, 9.85), ("Gribskov", 56.00, 12.30),
              ("Jægersborg Dyrehave", 55.79, 12.56), ("Silkeborg Sønderskov", 56.14, 9.57),
              ("Almindingen, Bornholm", 55.12, 14.92), ("Hareskoven", 55.76, 12.38),
              ("Tisvilde Hegn", 56.05, 12.06))
HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Svampeatlas</title></head>"
             b"<body><p>Billedet findes ikke.</p></body></html>\n")


def _short_id(r: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(r.choice(alphabet) for _ in range(r.choice((9, 10))))


def make_sample(out_dir: str, base_url: str, n_occurrences: int = 40, *, seed: int = 0,
                species: int = 5, photo_size: tuple[int, int] = (1024, 768),
                as_zip: bool = True, with_problems: bool = True) -> Sample:
    """A small Svampeatlas-like GBIF download plus its JPEGs in out_dir/images/.

    The caller serves out_dir/images/ at `base_url`. Each occurrence has 1-3
    good pictures of its species (species cycle 0..species-1). With
    `with_problems`, extra media rows cover what real downloads contain: a
    Sound row, an empty identifier, a 404, an HTML page named .JPG, a
    truncated JPEG (all must be skipped or fail without stopping the run), and
    good-but-awkward rows that must still become embeddings: a gbifID with a
    trailing space, an RGBA PNG, a grayscale JPEG, an EXIF-orientation-6 JPEG,
    and a description starting with a bare `"` (breaks readers that honour quotes).
    """
    if not 1 <= species <= len(FUNGI):
        raise ValueError(f"species must be 1..{len(FUNGI)}")
    if n_occurrences < 1:
        raise ValueError("n_occurrences must be at least 1")
    r = random.Random(seed)
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    base = base_url.rstrip("/") + "/"
    occurrences: list[Occurrence] = []
    media: list[Media] = []
    good: list[str] = []
    failures: dict[str, str] = {}
    skips: dict[str, int] = {}
    photo_no = 0

    def new_name(year: int, obs_id: int, ext: str = "JPG") -> str:
        return f"{year}-{obs_id}_{_short_id(r)}.{ext}"

    def save(name: str, data: bytes) -> str:
        with open(os.path.join(images_dir, name), "wb") as f:
            f.write(data)
        return base + name

    def photo(sp: int) -> Image.Image:
        nonlocal photo_no
        photo_no += 1
        return synthetic_photo(seed * 100_003 + photo_no, sp, photo_size)

    # gbifID -> (species index, year, obsId, photographer)
    obs: dict[int, tuple[int, int, int, str]] = {}
    associated: dict[int, str] = {}
    for i in range(n_occurrences):
        sp = i % species
        f = FUNGI[sp]
        gbif_id = 4_000_000_000 + i
        year, obs_id = r.randint(2016, 2025), 10_300_000 + seed * 10_000 + i * 7
        who = r.choice(PHOTOGRAPHERS)
        place, lat, lon = r.choice(LOCALITIES)
        obs[gbif_id] = (sp, year, obs_id, who)
        occurrences.append(Occurrence(
            gbifID=gbif_id, occurrenceID=f"https://svampe.databasen.org/observations/{obs_id}",
            datasetKey=DMS_DATASET_KEY, taxonKey=f.taxonKey, scientificName=f.scientificName,
            rightsHolder=who, recordedBy=who,
            eventDate=f"{year}-{r.randint(8, 11):02d}-{r.randint(1, 28):02d}",
            locality=place, decimalLatitude=round(lat + r.uniform(-0.03, 0.03), 5),
            decimalLongitude=round(lon + r.uniform(-0.05, 0.05), 5),
            family=f.family, genus=f.genus, species=f.species))
        licence = CC_BY_NC_URL if i % 4 == 3 else ""   # most DMS rows: empty licence
        urls = [save(new_name(year, obs_id), jpeg_bytes(photo(sp))) for _ in range(r.randint(1, 3))]
        media += [Media(gbif_id, u, creator=who, rightsHolder=who, license=licence) for u in urls]
        good += urls
        # The publisher's own list of its pictures, as verbatim.txt's associatedMedia.
        associated[gbif_id] = " | ".join(urls)

    if with_problems:
        ids = [o.gbifID for o in occurrences]
        target = lambda k: ids[k % len(ids)]  # noqa: E731  problem k goes to occurrence k

        def row(k: int, url: str, **kw) -> Media:
            who = obs[target(k)][3]
            m = Media(target(k), url, creator=who, rightsHolder=who, **kw)
            media.append(m)
            return m

        def name(k: int, ext: str = "JPG") -> str:
            _, year, obs_id, _ = obs[target(k)]
            return new_name(year, obs_id, ext)

        # Skipped without fetching.
        row(0, base + name(0, "mp3"), type="Sound", format="audio/mpeg")
        skips["not_still_image"] = 1
        row(1, "")
        skips["empty_identifier"] = 1
        # Fetched, and failing.
        url = base + name(2)                       # never written: the server answers 404
        row(2, url)
        failures[url] = "http_404"
        url = save(name(3), HTML_PAGE)
        row(3, url)
        failures[url] = "not_an_image"
        data = jpeg_bytes(photo(obs[target(4)][0]))
        url = save(name(4), data[: len(data) // 2])
        row(4, url)
        failures[url] = "truncated"
        # Awkward but good.
        url = save(name(5), jpeg_bytes(photo(obs[target(5)][0])))
        row(5, url).gbifID = f"{target(5)} "       # as in a real 2020 download
        good.append(url)
        rgba = photo(obs[target(6)][0]).convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
        buf = io.BytesIO()
        rgba.save(buf, "PNG")
        url = save(name(6, "png"), buf.getvalue())
        row(6, url, format="image/png")
        good.append(url)
        url = save(name(7), jpeg_bytes(photo(obs[target(7)][0]).convert("L")))
        row(7, url)
        good.append(url)
        # Pixels stored rotated 90° counter-clockwise; Orientation 6 tells viewers to turn
        # them back clockwise, so an EXIF-aware reader sees the species upright.
        upright = photo(obs[target(8)][0])
        url = save(name(8), jpeg_bytes(upright.transpose(Image.Transpose.ROTATE_90),
                                       exif_orientation=6))
        row(8, url)
        good.append(url)
        url = save(name(9), jpeg_bytes(photo(obs[target(9)][0])))
        row(9, url, description='"Rødlig hat, set fra siden')
        good.append(url)

    types: dict[int, list[str]] = {}
    for m in media:
        kinds = types.setdefault(int(str(m.gbifID).strip()), [])
        if m.type not in kinds:
            kinds.append(m.type)
    for o in occurrences:
        o.mediaType = ";".join(types.get(o.gbifID, []))

    key, doi = "0000001-261126000000000", "10.15468/dl.synth1"
    export = os.path.join(out_dir, key + (".zip" if as_zip else ""))
    write_dwca(export, occurrences, media, as_zip=as_zip, download_key=key, doi=doi,
               verbatim_associated_media=associated)
    return Sample(export=export, images_dir=images_dir, occurrences=occurrences, media=media,
                  expected_images=len(good), expected_failures=failures, expected_skips=skips,
                  download_key=key, doi=doi, good_identifiers=good)
