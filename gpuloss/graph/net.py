"""``Net``: an ordered list of layers exchanging named blobs (docs/graph.md §1, docs/graph.md §2).

Loss weights are Caffe's (http://caffe.berkeleyvision.org/tutorial/loss.html):
the net's objective is ``sum over layers, tops of loss_weight * sum(top.data)``;
a layer whose type ends in ``Loss`` weighs its first top 1, every other top
weighs 0 unless the layer gives ``loss_weight`` (one per top). ``forward`` adds
the weighted tops into one 0-d array with the backend's array module, so on a
GPU the total stays on the device until the caller reads it. ``backward`` seeds
each weighted top's diff with its weight and runs the layers in reverse.

In-place layers (a top named as its bottom, e.g. ``ReLU``) overwrite the blob.
A blob read by several layers receives the sum of their gradients (what
Caffe's automatic ``Split`` layers do); when the value an in-place layer
overwrites is also read by another layer, that layer gets its own buffer, so
every layer's backward still sees the values its forward saw.
"""
from __future__ import annotations

import math
import re
import statistics
import time as _time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from . import proto
from .blob import Blob
from .layer import GraphError, Layer, LayerContext
from .layers import LAYER_TYPES, layer_from_proto

__all__ = ["Net", "LossTerm"]

_PHASES = ("TRAIN", "TEST")


@dataclass(frozen=True)
class LossTerm:
    """One weighted top of the objective: ``weight * value`` enters the total (``value = sum(top)``)."""
    layer: str
    top: str
    weight: float
    value: object   # 0-d array on the backend's device; reading it synchronises

    @property
    def weighted(self):
        return self.value * self.weight


# Below this many bytes of logits (at the declared batch) a pair is left unfused unless asked: on the
# digits MLP (64 x 10 logits) fusing cost 0.87 against 0.69 ms a step (measured), for no memory gain.
FUSE_MIN_LOGITS_BYTES = 1 << 20


def _resolve_backend(name: str):
    from gpuloss.backends import default_backend_name, get_backend
    resolved = default_backend_name() if name == "auto" else name
    return resolved, get_backend(resolved).xp


class Net:
    """A Caffe-style net built from :class:`~gpuloss.graph.layer.Layer` objects.

    Parameters
    ----------
    layers : sequence of Layer
        In execution order. Layers whose include/exclude rules reject ``phase``
        are dropped, as in Caffe.
    backend : "auto", "cpu", "cuda" or "emulated"
        Where blobs live and which backend the loss layers call.
    dtype : parameters' and floating inputs' dtype (float32; float64 for gradient checks).
    phase, level, stages : the net state Caffe's ``NetStateRule`` tests.
    inputs : {name: shape}, net inputs without a layer (Caffe's ``input`` / ``input_shape``).
    force_backward : also compute gradients for the net inputs (Caffe's ``force_backward``).
    seed : seeds the fillers.
    validate : check labels on the host (default: on every backend but cuda, where it would sync).

    Examples
    --------
    >>> from gpuloss.graph import Net, layers as L                      # doctest: +SKIP
    >>> net = Net([L.Input("in", top=["x", "y"], shape=[(8, 4), (8,)]),
    ...            L.InnerProduct("fc", "x", "fc", num_output=3),
    ...            L.SoftmaxWithLoss("loss", ["fc", "y"], "loss")], backend="cpu")
    >>> total = net.forward(x=x, y=y); net.backward()
    """

    def __init__(self, layers, *, backend: str = "auto", dtype=np.float32, phase: str = "TRAIN",
                 level: int = 0, stages=(), inputs: dict | None = None, force_backward: bool = False,
                 seed: int | None = 0, validate: bool | None = None, name: str = ""):
        phase = str(phase).upper()
        if phase not in _PHASES:
            raise GraphError(f"phase must be 'TRAIN' or 'TEST', got {phase!r}")
        self.name, self.phase = name, phase
        self.backend, self.xp = _resolve_backend(backend)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise GraphError(f"dtype must be a floating dtype, got {self.dtype}")
        self.force_backward = bool(force_backward)
        self._ctx = LayerContext(xp=self.xp, dtype=self.dtype, backend=self.backend,
                                 rng=np.random.default_rng(seed),
                                 validate=(self.backend != "cuda") if validate is None else bool(validate))
        for layer in layers:
            if not isinstance(layer, Layer):
                raise GraphError(f"Net takes Layer objects, got {layer!r}")
        self.layers: list[Layer] = [l for l in layers if l.included_in(phase, level, stages)]
        self._nvtx = getattr(getattr(self.xp, "cuda", None), "nvtx", None)
        self._build(dict(inputs or {}))
        self._terms: list[LossTerm] = []
        self._forwarded = False

    # -- construction ------------------------------------------------------------------------

    def _build(self, inputs: dict) -> None:
        xp = self.xp
        names = Counter(l.name for l in self.layers)
        dup = [n for n, c in names.items() if c > 1]
        if dup:
            raise GraphError(f"layer name {dup[0]!r} is used by {names[dup[0]]} layers; names must be unique")

        # Pass 1: give every written value a version, count each version's readers.
        version, producer, readers = {}, {}, Counter()
        for name in inputs:
            version[name] = ("input", name)
            producer[version[name]] = "net input"
        for i, layer in enumerate(self.layers):
            for b in layer.bottom:
                if b not in version:
                    raise GraphError(f"layer {layer.name!r} ({layer.type}): bottom blob {b!r} is not made by "
                                     f"any earlier layer or net input (known blobs: {sorted(version) or 'none'})")
                readers[version[b]] += 1
            for t in layer.top:
                if t in layer.bottom:
                    if not getattr(layer, "supports_in_place", False):
                        raise GraphError(f"layer {layer.name!r} ({layer.type}) cannot run in place: its top "
                                         f"{t!r} is also its bottom")
                elif t in version:
                    raise GraphError(f"layer {layer.name!r} ({layer.type}): top blob {t!r} is already made by "
                                     f"{producer[version[t]]}; a name may be reused only in place (as the "
                                     f"layer's bottom too)")
                version[t] = (i, t)
                producer[version[t]] = f"layer {layer.name!r}"

        # Pass 2: blobs; an in-place top shares its bottom's blob unless another layer reads that value.
        self.blobs: dict[str, Blob] = {}
        self.input_names: list[str] = []
        self._input_shapes: dict[str, tuple] = {}
        self._input_blobs: dict[str, Blob] = {}   # blobs[name] may later be an in-place layer's copy
        shapes: dict[int, tuple] = {}
        current: dict[str, tuple] = {}
        for name, shape in inputs.items():
            blob = Blob(name, xp)
            self.blobs[name] = blob
            current[name] = (blob, ("input", name))
            self.input_names.append(name)
            self._input_blobs[name] = blob
            self._input_shapes[name] = shapes[id(blob)] = tuple(int(d) for d in shape)
        self._bottoms, self._tops = [], []
        for i, layer in enumerate(self.layers):
            bottoms = [current[b][0] for b in layer.bottom]
            try:
                top_shapes = layer.setup([shapes[id(b)] for b in bottoms], self._ctx)
            except GraphError:
                raise
            except (ValueError, TypeError) as exc:
                raise layer.error(str(exc)) from None
            tops = []
            for t, shape in zip(layer.top, top_shapes):
                if t in layer.bottom and readers[current[t][1]] == 1:
                    blob = current[t][0]
                else:
                    blob = Blob(t, xp)
                tops.append(blob)
                shapes[id(blob)] = tuple(shape)
                current[t] = (blob, (i, t))
                self.blobs[t] = blob
            if layer.type == "Input":
                for t, blob, shape in zip(layer.top, tops, top_shapes):
                    self.input_names.append(t)
                    self._input_blobs[t] = blob
                    self._input_shapes[t] = tuple(shape)
            self._bottoms.append(bottoms)
            self._tops.append(tops)
        self._shapes = shapes

        # Parameters, by layer name (Caffe's net.params).
        self.params: dict[str, list[Blob]] = {l.name: l.params for l in self.layers if l.params}

        # Weighted tops: Caffe's rule lives in Layer.loss_weights; weight 0 stays out of total and backward.
        self._weights = [[(j, w) for j, w in enumerate(l.loss_weights) if w != 0.0] for l in self.layers]

        # Which layers need backward (Caffe's Net::Init): a bottom gets a gradient when the layer can
        # pass one and the blob leads back to a learnable parameter (or force_backward asks for it).
        for blob in self._input_blobs.values():
            blob.need_backward = False
        self._propagate_down, self._need_backward = [], []
        for layer, bottoms, tops in zip(self.layers, self._bottoms, self._tops):
            pd = []
            for j, b in enumerate(bottoms):
                if layer.explicit_propagate_down is not None:
                    want = layer.explicit_propagate_down[j]
                    if want and not layer.differentiable(j):
                        raise layer.error(f"propagate_down is true for bottom {layer.bottom[j]!r}, "
                                          f"which it cannot backpropagate to (a label input)")
                else:
                    want = layer.differentiable(j) and (b.need_backward or self.force_backward)
                pd.append(bool(want))
            need = any(pd) or any(p.lr_mult != 0 for p in layer.params)
            for t in tops:
                t.need_backward = need
            self._propagate_down.append(pd)
            self._need_backward.append(need)
        self._fused_away = self._fuse_linear_heads(readers)

    def _fuse_linear_heads(self, readers) -> set:
        """Run each InnerProduct whose output only a SoftmaxWithLoss reads as one
        ``gpuloss.linear_cross_entropy`` call inside that loss layer (docs/graph.md §3.8): the same
        loss and gradients, without the [N, C] logits. Returns the InnerProducts' indices, which then
        do nothing themselves. Automatic when the declared logits take at least
        FUSE_MIN_LOGITS_BYTES; ``loss_param { fuse: true }`` fuses any size, ``fuse: false`` never.
        Anything that needs the logits keeps a pair apart (another reader, a loss_weight on them, a
        second top, explicit propagate_down).
        """
        from .layers.inner_product import InnerProduct
        from .layers.loss import FusedInput, SoftmaxWithLoss

        fused_away = set()
        for j, loss in enumerate(self.layers):
            if not isinstance(loss, SoftmaxWithLoss):
                continue
            loss._fused = None
            if loss.fuse is False or len(loss.top) != 1 or loss._axis != 1 or loss.explicit_propagate_down is not None:
                continue
            logits = self._bottoms[j][0]
            # the last layer before j that wrote the logits blob (an in-place layer may share it)
            i = next((k for k in reversed(range(j)) if any(t is logits for t in self._tops[k])), None)
            if i is None or not isinstance(self.layers[i], InnerProduct):
                continue
            ip = self.layers[i]
            if (ip._axis != 1 or ip.top[0] in ip.bottom or self._weights[i] or readers[(i, ip.top[0])] != 1
                    or ip.explicit_propagate_down is not None):
                continue
            logits_bytes = math.prod(self._shapes[id(logits)]) * self.dtype.itemsize
            if loss.fuse is None and logits_bytes < FUSE_MIN_LOGITS_BYTES:
                continue   # small logits: fusing saves no memory worth its per-call overhead
            loss._fused = FusedInput(ip, self._bottoms[i][0], self._propagate_down[i][0])
            fused_away.add(i)
        return fused_away

    @classmethod
    def from_prototxt(cls, text_or_path, phase: str = "TRAIN", backend: str = "auto", **kwargs) -> "Net":
        """Build from Caffe's text format (a path or the text itself), keeping ``phase``'s layers.

        Net-level ``input`` / ``input_shape`` (or the older ``input_dim``) declare
        inputs without a layer; ``force_backward`` and ``state { level stage }``
        are read; ``state``'s phase is replaced by ``phase`` as Caffe's tools do.
        A ``pathlib.Path`` is always read as a file.
        """
        msg, source, text = proto.parse_net(text_or_path, supported_types=tuple(LAYER_TYPES), with_text=True)
        return cls.from_proto(msg, phase=phase, backend=backend, source=source, text=text, **kwargs)

    @classmethod
    def from_proto(cls, msg, *, phase: str = "TRAIN", backend: str = "auto", source: str = "<net>",
                   text: str | None = None, **kwargs) -> "Net":
        """Build from a parsed ``NetParameter`` message (see :mod:`gpuloss.graph.proto`); ``text``, the
        prototxt it was parsed from, lets errors name the line of the field at fault."""
        index = {lp.name: i for i, lp in enumerate(msg.layer)}
        try:
            if msg.input_dim and msg.input_shape:
                raise GraphError("give input_shape or input_dim, not both", field="input_dim")
            if msg.input_dim:
                if len(msg.input_dim) != 4 * len(msg.input):
                    raise GraphError(f"input_dim needs 4 values per input ({len(msg.input)} inputs), "
                                     f"got {len(msg.input_dim)}", field="input_dim")
                shapes = [tuple(msg.input_dim[4 * k:4 * k + 4]) for k in range(len(msg.input))]
            else:
                shapes = [tuple(s.dim) for s in msg.input_shape]
            if len(shapes) != len(msg.input):
                raise GraphError(f"{len(msg.input)} net input(s) {list(msg.input)} but {len(shapes)} "
                                 f"input_shape(s): give one shape per input", field="input")
            for name, shape in zip(msg.input, shapes):
                if any(d < 0 for d in shape):
                    raise GraphError(f"net input {name!r}: shape dimensions must be >= 0, got {shape}",
                                     field="input_shape")
            inputs = dict(zip(msg.input, shapes))
            layers = []
            for i, lp in enumerate(msg.layer):
                try:
                    layers.append(layer_from_proto(lp))
                except GraphError as exc:
                    exc.layer = i    # by position: names may be missing or repeated here
                    raise
            kwargs.setdefault("force_backward", msg.force_backward)
            if msg.HasField("state"):
                kwargs.setdefault("level", msg.state.level)
                kwargs.setdefault("stages", tuple(msg.state.stage))
            return cls(layers, backend=backend, phase=phase, inputs=inputs, name=msg.name, **kwargs)
        except GraphError as exc:
            layer = exc.layer if isinstance(exc.layer, int) else index.get(exc.layer)
            if layer is not None:
                where = proto.locate(text, source, (("layer", layer),) + proto.field_path(exc.field))
            else:
                where = proto.locate(text, source, exc.field) if exc.field else source
            raise proto.FieldError(f"{where}: {exc}", field=exc.field) from None

    # -- running ---------------------------------------------------------------------------------

    def _set_inputs(self, inputs: dict) -> None:
        for name in inputs:
            if name not in self._input_shapes:
                raise GraphError(f"forward() got input {name!r}, but the net's inputs are {self.input_names}")
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise GraphError(f"forward() needs every net input on every call: missing {missing} "
                             f"(inputs: {self.input_names})")
        for name, value in inputs.items():
            self._set_input(name, value)

    def _set_input(self, name: str, value) -> None:
        if name not in self._input_shapes:
            raise GraphError(f"forward() got input {name!r}, but the net's inputs are {self.input_names}")
        xp = self.xp
        kind = getattr(getattr(value, "dtype", None), "kind", None) or np.asarray(value).dtype.kind
        if kind not in "biuf":   # strings, objects, complex: no layer computes with them
            raise GraphError(f"input {name!r} must hold real numbers, got an array of dtype kind {kind!r}")
        dtype = self.dtype if kind == "f" else None
        # A copy: in-place layers overwrite their blob, and the caller's array must not change.
        arr = xp.array(value, dtype=dtype, copy=True)
        declared = self._input_shapes[name]
        if arr.ndim != len(declared) or tuple(arr.shape[1:]) != tuple(declared[1:]):
            raise GraphError(f"input {name!r} has shape {tuple(arr.shape)}; the net declares "
                             f"{declared} (any batch size, the other dimensions as declared)")
        self._input_blobs[name].data = arr

    def forward(self, **inputs):
        """Run every layer; return the total loss as a 0-d array on the backend's device.

        Inputs are given by blob name, every one of them on every call: an input
        left out is an error, not the previous call's value silently reused.
        """
        self._set_inputs(inputs)
        self._total = self.xp.zeros((), dtype=self.dtype)
        self._terms = []
        for i in range(len(self.layers)):
            self._forward_layer(i)
        self._forwarded = True
        return self.xp.asarray(self._total, dtype=self.dtype)

    def _forward_layer(self, i: int) -> None:
        if i in self._fused_away:   # an InnerProduct that its SoftmaxWithLoss runs (fused)
            return
        layer, tops = self.layers[i], self._tops[i]
        if self._nvtx is not None:   # Nsight shows the net's structure (docs/design.md §8)
            self._nvtx.RangePush(f"{layer.name} forward")
        try:
            layer.forward(self._bottoms[i], tops)
        except GraphError:
            raise
        except ValueError as exc:   # e.g. a label out of range, found by the functional API
            # The functional API's hint names its own argument; in a net it is Net(validate=...).
            text = re.sub(r"pass validate=False", "build the Net with validate=False", str(exc))
            raise layer.error(text) from exc
        finally:
            if self._nvtx is not None:
                self._nvtx.RangePop()
        for j, w in self._weights[i]:  # right after the layer, as Caffe's Layer::Forward: in-place safe
            value = self.xp.asarray(self.xp.sum(tops[j].data))
            self._total = self._total + (value * w).astype(self.dtype, copy=False)
            self._terms.append(LossTerm(layer.name, layer.top[j], w, value))

    def backward(self) -> None:
        """Gradients of the last forward's total loss: blobs' and parameters' ``diff``.

        Each weighted top's diff is seeded with its ``loss_weight`` (added to what
        the layers reading it passed back) when the reverse pass reaches the layer
        that made it, which for an in-place top is the value that layer wrote.
        Parameter diffs are overwritten, not accumulated across calls.
        """
        if not self._forwarded:
            raise GraphError("backward() needs a forward() first")
        for b in self.blobs.values():
            b.clear_diff()
        for tops in self._tops:
            for t in tops:
                t.clear_diff()
        for p in self.learnable_params:
            p.clear_diff()
        for i in reversed(range(len(self.layers))):
            self._backward_layer(i)

    def _backward_layer(self, i: int) -> None:
        xp, layer, tops, bottoms = self.xp, self.layers[i], self._tops[i], self._bottoms[i]
        for j, w in self._weights[i]:
            seed = xp.full(tops[j].data.shape, w, dtype=tops[j].data.dtype)
            tops[j].diff = seed if not tops[j].has_diff else tops[j].diff + seed
        if not self._need_backward[i] or not any(t.has_diff for t in tops):
            return  # nothing this layer made reaches the loss, or nothing behind it learns
        pd = self._propagate_down[i]
        if self._nvtx is not None:
            self._nvtx.RangePush(f"{layer.name} backward")
        try:
            grads = layer.backward(tops, pd, bottoms)
        finally:
            if self._nvtx is not None:
                self._nvtx.RangePop()
        for j, (b, g) in enumerate(zip(bottoms, grads)):
            in_place = any(b is t for t in tops)
            if g is None or not pd[j]:
                if in_place:
                    b.clear_diff()  # the value before this layer gets no gradient
                continue
            b.diff = g if (in_place or not b.has_diff) else b.diff + g

    # -- inspection ------------------------------------------------------------------------------

    @property
    def loss_terms(self) -> list[LossTerm]:
        """Each weighted top of the last forward: layer, top, weight and value (0-d device array)."""
        return list(self._terms)

    @property
    def learnable_params(self) -> list[Blob]:
        return [p for ps in self.params.values() for p in ps]

    @property
    def weighted_tops(self) -> list[tuple[str, str, float]]:
        """``(layer, top, loss_weight)`` of every top that enters the total."""
        return [(l.name, l.top[j], w) for l, ws in zip(self.layers, self._weights) for j, w in ws]

    def input_shape(self, name: str) -> tuple:
        return self._input_shapes[name]

    @property
    def input_blobs(self) -> dict[str, Blob]:
        """The blobs ``forward`` fills, by name (differs from ``blobs[name]`` when an in-place layer
        that must keep the input intact writes a copy under the same name)."""
        return dict(self._input_blobs)

    def share_params_from(self, other: "Net") -> None:
        """Use ``other``'s parameter blobs for every same-named layer (Caffe's ShareTrainedLayersWith)."""
        for layer in self.layers:
            if layer.params and layer.name in other.params:
                theirs = other.params[layer.name]
                if [tuple(p.data.shape) for p in theirs] != [tuple(p.data.shape) for p in layer.params]:
                    raise GraphError(f"layer {layer.name!r}: parameter shapes differ between the nets")
                layer.params[:] = theirs
        self.params = {l.name: l.params for l in self.layers if l.params}

    def example_inputs(self, seed: int = 0, batch: int | None = None) -> dict:
        """NumPy inputs of the declared shapes that every layer accepts (labels in range), for timing."""
        rng = np.random.default_rng(seed)
        out = {}
        for name in self.input_names:
            shape = self._input_shapes[name]
            if batch is not None and shape:
                shape = (batch,) + tuple(shape[1:])
            value = None
            for layer, bottoms in zip(self.layers, self._bottoms):
                for j, b in enumerate(bottoms):
                    if b is self._input_blobs[name] and value is None:
                        value = layer.example_input(j, shape, rng)
            out[name] = rng.standard_normal(shape) if value is None else value
        return out

    def time(self, iterations: int = 50, inputs: dict | None = None, warmup: int = 1) -> list[dict]:
        """Per-layer forward/backward wall times like ``caffe time``: medians in ms over ``iterations``.

        On a GPU each layer is followed by a stream synchronisation, so each
        time is that layer's own device time plus its launch overhead.
        """
        if iterations < 1:
            raise GraphError(f"iterations must be >= 1, got {iterations}")
        if inputs is None:
            inputs = self.example_inputs()
        self._set_inputs(inputs)
        sync = _synchronizer(self.xp)
        n = len(self.layers)
        fwd, bwd = [[] for _ in range(n)], [[] for _ in range(n)]
        for it in range(warmup + iterations):
            self._total = self.xp.zeros((), dtype=self.dtype)
            self._terms = []
            for i in range(n):
                t0 = _time.perf_counter()
                self._forward_layer(i)
                sync()
                if it >= warmup:
                    fwd[i].append(_time.perf_counter() - t0)
            self._forwarded = True
            for b in self.blobs.values():
                b.clear_diff()
            for tops in self._tops:
                for t in tops:
                    t.clear_diff()
            for i in reversed(range(n)):
                t0 = _time.perf_counter()
                self._backward_layer(i)
                sync()
                if it >= warmup:
                    bwd[i].append(_time.perf_counter() - t0)
        return [{"layer": l.name, "type": l.type,
                 "forward_ms": 1e3 * statistics.median(f), "backward_ms": 1e3 * statistics.median(b)}
                for l, f, b in zip(self.layers, fwd, bwd)]

    def __repr__(self) -> str:
        return (f"Net({self.name!r}, phase={self.phase}, backend={self.backend}, "
                f"layers={[l.name for l in self.layers]})")


def _synchronizer(xp):
    cuda = getattr(xp, "cuda", None)
    if cuda is not None and hasattr(cuda, "get_current_stream"):
        return lambda: cuda.get_current_stream().synchronize()
    return lambda: None

