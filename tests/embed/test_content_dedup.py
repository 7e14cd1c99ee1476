"""Each distinct content embedded once per process: known contents take their
embedding, twins in flight wait for it, and nothing is lost on the way."""
from __future__ import annotations

import numpy as np
import pytest
from apache_beam.pvalue import TaggedOutput

from transforms.embed import dedup as content_dedup
from transforms.embed.dedup import KNOWN, _SkipKnown, remember


@pytest.fixture(autouse=True)
def fresh():
    content_dedup.forget()
    yield
    content_dedup.forget()


def _image(sha: str, *ids: int) -> dict:
    return {"image_sha256": sha, "content": b"bytes",
            "tasks": [{"gbifID": i, "identifier": f"u{i}"} for i in ids]}


def _split(outputs) -> tuple[list, list]:
    outputs = [getattr(o, "value", o) if not isinstance(o, TaggedOutput) else o
               for o in outputs]
    passed = [o for o in outputs if not isinstance(o, TaggedOutput)]
    known = [o.value for o in outputs if isinstance(o, TaggedOutput) and o.tag == KNOWN]
    return passed, [getattr(k, "value", k) for k in known]


def test_a_twin_waits_for_the_embedding_and_takes_it():
    dofn = _SkipKnown("sha256:model", "run-1")
    dofn.start_bundle()
    first, _ = _split(dofn.process(_image("s1", 1)))
    held, _ = _split(dofn.process(_image("s1", 2, 3)))  # the same content, another URL
    assert [p["tasks"][0]["gbifID"] for p in first] == [1] and held == []
    remember("run-1", dict(first[0], width=4, height=3), np.ones(256, np.float32))
    passed, known = _split(dofn.process(_image("s2", 4)))
    assert [p["image_sha256"] for p in passed] == ["s2"]
    assert sorted(r["gbifID"] for r in known) == [2, 3]
    assert all(r["width"] == 4 and r["embedding"].sum() == 256 for r in known)
    _, again = _split(dofn.process(_image("s1", 5)))  # known now: no wait at all
    assert [r["gbifID"] for r in again] == [5]


def test_a_held_twin_is_never_lost():
    dofn = _SkipKnown("sha256:model", "run-1")
    dofn.start_bundle()
    list(dofn.process(_image("s1", 1)))
    assert _split(dofn.process(_image("s1", 2))) == ([], [])
    passed, known = _split(dofn.finish_bundle())  # the twin never came back
    assert [p["tasks"][0]["gbifID"] for p in passed] == [2] and known == []


def test_another_run_embeds_again():
    remember("run-1", _image("s1", 1), np.ones(256, np.float32))
    dofn = _SkipKnown("sha256:model", "run-2")
    dofn.start_bundle()
    passed, known = _split(dofn.process(_image("s1", 1)))
    assert len(passed) == 1 and known == []
