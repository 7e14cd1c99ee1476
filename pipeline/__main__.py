"""`python -m pipeline run ...` is the same as `gbif-embed run ...`."""
from pipeline.cli import console

console()
