# SDK worker image for Dataflow (--sdk_container_image) and for the Flink
# worker-pool sidecar: Beam's own Python SDK image of the same Beam version,
# with gbif-embed and its pinned dependencies installed, so workers start
# without pip-installing TensorFlow at boot.
#
# Workers must run the launcher's Python minor version: pass it as
# PYTHON_VERSION (3.11, 3.12 or 3.13) and name it in the tag, which
# `gbif-embed run` checks against its own Python (see pipeline/sdk_image.py).
#
#   docker build --build-arg PYTHON_VERSION=3.12 -t REGION-docker.pkg.dev/PROJECT/REPO/gbif-embed:0.1-py3.12 .
#   docker build --build-arg PYTHON_VERSION=3.12 --build-arg GPU=1 -t REGION-docker.pkg.dev/PROJECT/REPO/gbif-embed:0.1-py3.12-gpu .
ARG PYTHON_VERSION=3.11
FROM apache/beam_python${PYTHON_VERSION}_sdk:2.77.0

ARG GPU=0
WORKDIR /opt/gbif-embed
COPY setup.py README.md ./
COPY pipeline ./pipeline
COPY transforms ./transforms
RUN pip install --no-cache-dir . \
 && if [ "$GPU" = "1" ]; then pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0"; fi

# The Beam SDK harness stays the entry point (inherited from the base image).
