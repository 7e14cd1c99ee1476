"""A real Apache Flink cluster on this machine: `gbif-embed flink start|stop|status`.

The distribution comes from PyPI, Beam's Flink job server jar from Maven
Central; both are cached outside the repository (~/.cache/gbif-embed/flink)."""
