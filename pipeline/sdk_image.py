"""Workers must run the launcher's Python minor version.

Beam pickles the pipeline's functions with the launcher's Python, and the
workers' wheels (TensorFlow, pyarrow, ...) are built for one minor version, so
a Dataflow or Flink worker image made for Python 3.11 cannot run a job
launched from Python 3.12. Beam picks a matching image by itself when none is
given; this module checks the one the user names.

The rule. An image reference `[REGISTRY/]PATH/NAME[:TAG][@DIGEST]` names a
Python version where its NAME (the last path segment) or its TAG contains
`py` or `python` followed by `3.X` or `3X`, not glued to a preceding letter or
digit: `apache/beam_python3.12_sdk:2.77.0`, `.../gbif-embed:0.1-py3.12`,
`.../gbif-embed:py312-gpu`. Docker's official `python:3.12-slim` counts too
(NAME `python`, TAG starting `3.X`). The registry host, the other path
segments and the digest are not read. Every version named must be the
launcher's `3.X`, or the launch is refused; an image that names none is
accepted with a warning, since nothing tells what it runs.

Images are read from `--sdk_container_image`, the legacy
`--worker_harness_container_image`, and, with `--environment_type DOCKER`
(portable runners), `--environment_option docker_container_image=...` or
`--environment_config`.
"""
from __future__ import annotations

import logging
import re
import sys
from typing import List, Optional, Tuple

Version = Tuple[int, int]

# `py` or `python`, then 3, an optional dot, and the minor version; neither
# glued to a letter or digit before it nor followed by another digit.
_NAMED = re.compile(r"(?<![a-z0-9])(?:python|py)3\.?(\d{1,2})(?!\d)", re.IGNORECASE)
# Docker's official image: python:3.12, python:3.12-slim, python:3.12.4-bookworm.
_OFFICIAL_TAG = re.compile(r"^3\.(\d{1,2})(?!\d)")

# The Pythons gbif-embed supports (setup.py's python_requires).
SUPPORTED = ((3, 11), (3, 12), (3, 13))

_LOGGER = logging.getLogger(__name__)


class SdkImageError(ValueError):
    """An SDK container image built for another Python than the launcher's."""


def split_reference(image: str) -> Tuple[str, str]:
    """(NAME, TAG) of an image reference: the last path segment and the tag
    ('' when absent); registry host, port, other path segments and digest dropped."""
    reference = image.strip().split("@", 1)[0]
    last = reference.rsplit("/", 1)[-1]
    name, _, tag = last.partition(":")
    return name, tag


def named_versions(image: str) -> List[Version]:
    """The Python versions an image's name and tag name, in order, without repeats."""
    name, tag = split_reference(image)
    found: List[Version] = []
    for part in (name, tag):
        for match in _NAMED.finditer(part):
            found.append((3, int(match.group(1))))
    if name.lower() == "python":
        official = _OFFICIAL_TAG.match(tag)
        if official:
            found.append((3, int(official.group(1))))
    return list(dict.fromkeys(found))


def _text(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


def check_image(image: str, flag: str = "--sdk_container_image",
                python: Optional[Version] = None) -> Optional[Version]:
    """Raises SdkImageError when `image` names another Python minor version than
    `python` (default: the running interpreter's); returns the version it names,
    or None (after a warning) when it names none."""
    python = python or (sys.version_info[0], sys.version_info[1])
    versions = named_versions(image)
    if not versions:
        _LOGGER.warning(
            "%s %s names no Python version (such as py%s in its tag), so it cannot be "
            "checked: its workers must run Python %s, the launcher's, or the job fails "
            "on them", flag, image, _text(python), _text(python))
        return None
    wrong = [v for v in versions if v != python]
    if wrong:
        named = " and ".join(f"Python {_text(v)}" for v in versions)
        advice = (f"build the image for Python {_text(python)} (docker build --build-arg "
                  f"PYTHON_VERSION={_text(python)} -t .../gbif-embed:0.1-py{_text(python)} .)")
        if wrong[0] in SUPPORTED:
            advice += f" or launch from Python {_text(wrong[0])}"
        raise SdkImageError(
            f"{flag} {image} names {named}, but this launcher runs Python "
            f"{_text(python)}: expected an image for Python {_text(python)}, because "
            f"workers must run the launcher's Python minor version; {advice}")
    return versions[0]


def images_in(options) -> List[Tuple[str, str]]:
    """(flag, image) for each worker image the pipeline options name."""
    from apache_beam.options.pipeline_options import PortableOptions, WorkerOptions
    worker = options.view_as(WorkerOptions)
    found = [("--sdk_container_image", worker.sdk_container_image),
             ("--worker_harness_container_image", worker.worker_harness_container_image)]
    portable = options.view_as(PortableOptions)
    if (portable.environment_type or "").upper() == "DOCKER":
        found.append(("--environment_option docker_container_image",
                      portable.lookup_environment_option("docker_container_image")))
        found.append(("--environment_config", portable.environment_config))
    seen, images = set(), []
    for flag, image in found:
        if image and image not in seen:
            seen.add(image)
            images.append((flag, image))
    return images


def check_sdk_image(options, python: Optional[Version] = None) -> None:
    """The launcher's check: refuses worker images named for another Python."""
    for flag, image in images_in(options):
        check_image(image, flag, python)
