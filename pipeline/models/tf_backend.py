"""The TensorFlow backend: one set of ops for TF1 graphs and TF2 functions.

TF1 Hub modules and TF2 SavedModels differ only in how variables come to
exist, so the ops are shared and a variable store is chosen per format:

* `TF1Variables`: `tf.compat.v1.get_variable` in a graph, zero-initialised,
  with the real values loaded into a session afterwards. The values never
  become graph constants, which keeps `saved_model.pb` small, as in the real
  module.
* `TF2Variables`: eager `tf.Variable`s. `tf.function` refuses to create
  variables while it traces, so a format writer first runs the network eagerly
  on one picture (which creates every variable; never on an empty batch, whose
  shapes oneDNN's kernels get wrong) and then traces it, when the store hands
  back the same variables by name.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, Sequence

import numpy as np
import tensorflow as tf

from pipeline.models.backend import check_groups, nested

tf1 = tf.compat.v1


class VariableStore(Protocol):
    def get(self, name: str, value: np.ndarray) -> tf.Variable:
        """The variable called `name`, holding (or to hold) `value`."""


class TF1Variables:
    """Graph variables, plus the values `load_into` feeds them."""

    def __init__(self) -> None:
        self.assignments: list[tuple[tf.Variable, np.ndarray]] = []

    def get(self, name: str, value: np.ndarray) -> tf.Variable:
        # A zeros initializer is a tiny Fill op in the graph; the real values
        # are fed in by `load_into`, never stored as constants.
        var = tf1.get_variable(name, shape=value.shape, dtype=tf.float32,
                               initializer=tf1.zeros_initializer())
        self.assignments.append((var, value))
        return var

    def load_into(self, sess: tf1.Session) -> None:
        for var, value in self.assignments:
            var.load(value, sess)


class TF2Variables:
    """Eager variables, created on the first (eager) pass, reused when tracing."""

    def __init__(self) -> None:
        self.variables: dict[str, tf.Variable] = {}

    def get(self, name: str, value: np.ndarray) -> tf.Variable:
        var = self.variables.get(name)
        if var is None:
            if not tf.executing_eagerly():
                raise RuntimeError(f"variable {name!r} was not created by the eager pass; "
                                   "run the network eagerly once before tracing it")
            # Eager variables take the enclosing name scopes' prefix, which is
            # the backend's scope path already: only the leaf is passed.
            var = tf.Variable(value.astype(np.float32), name=name.rsplit("/", 1)[-1])
            self.variables[name] = var
        elif tuple(var.shape) != value.shape:
            raise ValueError(f"variable {name!r} has shape {tuple(var.shape)}, "
                             f"the network now asks for {value.shape}")
        return var


class TFBackend:
    """The backend ops (see `pipeline.models.backend`) as TensorFlow ops, NHWC."""

    def __init__(self, variables: VariableStore) -> None:
        self._variables = variables
        self._path: list[str] = []

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        # name_scope names the ops (`InceptionV4/global_pool`); the path names
        # the variables, so both follow one hierarchy in TF1 and TF2 alike.
        with tf.name_scope(name), nested(self._path, name):
            yield

    def _variable(self, leaf: str, value: np.ndarray) -> tf.Variable:
        return self._variables.get("/".join([*self._path, leaf]), value)

    def channels(self, x: tf.Tensor) -> int:
        return int(x.shape[-1])

    def conv(self, x: tf.Tensor, kernel: np.ndarray, bias: np.ndarray | None, stride: int = 1,
             padding: str = "SAME", groups: int = 1) -> tf.Tensor:
        check_groups(kernel, self.channels(x), groups)
        if groups == 1:
            y = tf.nn.conv2d(x, self._variable("weights", kernel), strides=stride, padding=padding)
        else:
            # [kh, kw, 1, C] -> TF's depthwise layout [kh, kw, C, multiplier=1].
            weights = self._variable("depthwise_weights", kernel.transpose(0, 1, 3, 2))
            y = tf.nn.depthwise_conv2d(x, weights, strides=[1, stride, stride, 1],
                                       padding=padding)
        if bias is None:
            return y
        return tf.nn.bias_add(y, self._variable("biases", bias))

    def relu(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(x)

    def relu6(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu6(x)

    def max_pool(self, x: tf.Tensor, size: int, stride: int, padding: str) -> tf.Tensor:
        return tf.nn.max_pool2d(x, size, strides=stride, padding=padding)

    def avg_pool(self, x: tf.Tensor, size: int, stride: int, padding: str) -> tf.Tensor:
        return tf.nn.avg_pool2d(x, size, strides=stride, padding=padding)

    def concat(self, xs: Sequence[tf.Tensor]) -> tf.Tensor:
        return tf.concat(list(xs), axis=-1)

    def add(self, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        return tf.add(a, b)

    def global_mean(self, x: tf.Tensor, name: str = "global_pool") -> tf.Tensor:
        return tf.reduce_mean(x, axis=[1, 2], name=name)

    def dense(self, x: tf.Tensor, weights: np.ndarray, bias: np.ndarray) -> tf.Tensor:
        y = tf.matmul(x, self._variable("weights", weights))
        return tf.nn.bias_add(y, self._variable("biases", bias))

    def affine(self, x: tf.Tensor, scale: np.ndarray, shift: np.ndarray) -> tf.Tensor:
        return x * _constant(scale) + _constant(shift)


def _constant(values: np.ndarray) -> float | tf.Tensor:
    """A scalar stays a Python float: `x * 2.0 + -1.0`, the simplest graph."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    return float(values[0]) if values.size == 1 else tf.constant(values)
