"""`python -m pipeline run ...` is the same as `gbif-embed run ...`."""
import sys

from pipeline.cli import main

sys.exit(main())
