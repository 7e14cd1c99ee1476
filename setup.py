"""gbif-embed: GBIF occurrence downloads to image embeddings with Apache Beam.

Also what Dataflow workers install with `--setup_file ./setup.py`.
"""
import setuptools

# Versions resolved and tested together on Python 3.11 (see README).
REQUIRED = [
    "apache-beam[gcp]==2.77.0",
    "tensorflow-cpu==2.21.0",
    "tensorflow-hub==0.16.1",
    "pyarrow==25.0.1",
    "gcsfs==2026.10.1",
    "numpy==2.4.6",
    "protobuf==6.33.6",
    "Pillow==12.3.0",
]

TESTS = [
    "pytest==9.2.0",
    "gcp-storage-emulator==2026.7.19",
]

setuptools.setup(
    name="gbif-embed",
    version="0.1.0",
    description="Image embeddings for GBIF occurrence downloads, with Apache Beam",
    python_requires=">=3.11,<3.12",
    packages=["pipeline", "transforms"],
    install_requires=REQUIRED,
    extras_require={"test": TESTS},
    entry_points={"console_scripts": ["gbif-embed = pipeline.cli:main"]},
)
