# SDK worker image for Dataflow (--sdk_container_image) and for the Flink
# worker-pool sidecar: Beam's own Python 3.11 SDK image of the same Beam
# version, with gbif-embed and its pinned dependencies installed, so workers
# start without pip-installing TensorFlow at boot.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/gbif-embed:0.1 .
#   docker build --build-arg GPU=1 -t REGION-docker.pkg.dev/PROJECT/REPO/gbif-embed:0.1-gpu .
FROM apache/beam_python3.11_sdk:2.77.0

ARG GPU=0
WORKDIR /opt/gbif-embed
COPY setup.py README.md ./
COPY pipeline ./pipeline
COPY transforms ./transforms
RUN pip install --no-cache-dir . \
 && if [ "$GPU" = "1" ]; then pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0"; fi

# The Beam SDK harness stays the entry point (inherited from the base image).
