"""TensorFlow's import as every embedding process does it (`import_tensorflow`),
in a fresh interpreter: what it leaves imported, and what it still lets import."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
from transforms.embed.tf_quiet import import_tensorflow
tf = import_tensorflow()
after_import = "sklearn" in sys.modules
import sklearn.base  # still importable once TensorFlow is in
print(json.dumps({"after_import": after_import, "tf": tf.__version__,
                  "later": sklearn.base.__name__}))
"""


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="scikit-learn is not installed here (the explore extra installs it)")
def test_tensorflow_import_leaves_sklearn_out_and_importable():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=300, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["after_import"] is False  # Keras' wrappers did not load it
    assert found["later"] == "sklearn.base"
