"""Caffe's prototxt, read with the ``protobuf`` package against a schema built in code.

The schema is the subset of Caffe's ``src/caffe/proto/caffe.proto`` that gpuloss
implements, with Caffe's own message names, field names and field numbers, so a
real Caffe ``.prototxt`` parses unchanged with ``google.protobuf.text_format``.
It is assembled as a ``FileDescriptorProto`` (proto2, package ``caffe``) in a
private descriptor pool: no ``protoc`` step, no generated ``_pb2`` file.

A field that Caffe has but this subset lacks fails inside ``text_format``; the
``ParseError`` is re-raised as :class:`PrototxtError` naming the file, the line,
the enclosing layer (name and type) and the field.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from functools import lru_cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from .layer import GraphError

__all__ = ["PrototxtError", "FieldError", "NetParameter", "SolverParameter", "parse_net", "parse_solver",
           "read_text", "message_class", "field_lines", "field_path", "locate"]

_F = descriptor_pb2.FieldDescriptorProto
_SCALAR = {"string": _F.TYPE_STRING, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE,
           "bool": _F.TYPE_BOOL, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64,
           "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64}

# (message, [(field, number, type, repeated?, default)]), numbers from Caffe's caffe.proto
# (BVLC master; SmoothL1LossParameter from Fast R-CNN's fork, rbgirshick/caffe-fast-rcnn).
# A type that is not a scalar names a message or an enum of this file.
_ENUMS = {
    "Phase": [("TRAIN", 0), ("TEST", 1)],
    "FillerParameter.VarianceNorm": [("FAN_IN", 0), ("FAN_OUT", 1), ("AVERAGE", 2)],
    "ParamSpec.DimCheckMode": [("STRICT", 0), ("PERMISSIVE", 1)],
    "LossParameter.NormalizationMode": [("FULL", 0), ("VALID", 1), ("BATCH_SIZE", 2), ("NONE", 3)],
    "Engine": [("DEFAULT", 0), ("CAFFE", 1), ("CUDNN", 2)],
    "SolverParameter.SnapshotFormat": [("HDF5", 0), ("BINARYPROTO", 1)],
    "SolverParameter.SolverMode": [("CPU", 0), ("GPU", 1)],
    "SolverParameter.SolverType": [("SGD", 0), ("NESTEROV", 1), ("ADAGRAD", 2), ("RMSPROP", 3),
                                   ("ADADELTA", 4), ("ADAM", 5)],
}

_MESSAGES = {
    "BlobShape": [("dim", 1, "int64", True, None)],
    "FillerParameter": [
        ("type", 1, "string", False, "constant"), ("value", 2, "float", False, "0"),
        ("min", 3, "float", False, "0"), ("max", 4, "float", False, "1"),
        ("mean", 5, "float", False, "0"), ("std", 6, "float", False, "1"),
        ("sparse", 7, "int32", False, "-1"),
        ("variance_norm", 8, "FillerParameter.VarianceNorm", False, "FAN_IN")],
    "NetState": [("phase", 1, "Phase", False, "TEST"), ("level", 2, "int32", False, "0"),
                 ("stage", 3, "string", True, None)],
    "NetStateRule": [("phase", 1, "Phase", False, None), ("min_level", 2, "int32", False, None),
                     ("max_level", 3, "int32", False, None), ("stage", 4, "string", True, None),
                     ("not_stage", 5, "string", True, None)],
    "ParamSpec": [("name", 1, "string", False, None),
                  ("share_mode", 2, "ParamSpec.DimCheckMode", False, None),
                  ("lr_mult", 3, "float", False, "1"), ("decay_mult", 4, "float", False, "1")],
    # z_loss, softcap and fuse are gpuloss's extension of Caffe's LossParameter (numbers far above
    # Caffe's own, so no Caffe field can clash); only SoftmaxWithLoss reads them.
    "LossParameter": [("ignore_label", 1, "int32", False, None), ("normalize", 2, "bool", False, None),
                      ("normalization", 3, "LossParameter.NormalizationMode", False, "VALID"),
                      ("z_loss", 1001, "float", False, "0"), ("softcap", 1002, "float", False, None),
                      ("fuse", 1003, "bool", False, None)],
    "AccuracyParameter": [("top_k", 1, "uint32", False, "1"), ("axis", 2, "int32", False, "1"),
                          ("ignore_label", 3, "int32", False, None)],
    "InnerProductParameter": [
        ("num_output", 1, "uint32", False, None), ("bias_term", 2, "bool", False, "true"),
        ("weight_filler", 3, "FillerParameter", False, None),
        ("bias_filler", 4, "FillerParameter", False, None),
        ("axis", 5, "int32", False, "1"), ("transpose", 6, "bool", False, "false")],
    "InputParameter": [("shape", 1, "BlobShape", True, None)],
    "ReLUParameter": [("negative_slope", 1, "float", False, "0"), ("engine", 2, "Engine", False, "DEFAULT")],
    "SigmoidParameter": [("engine", 1, "Engine", False, "DEFAULT")],
    "TanHParameter": [("engine", 1, "Engine", False, "DEFAULT")],
    "SoftmaxParameter": [("engine", 1, "Engine", False, "DEFAULT"), ("axis", 2, "int32", False, "1")],
    "SmoothL1LossParameter": [("sigma", 1, "float", False, "1")],
    "LayerParameter": [
        ("name", 1, "string", False, None), ("type", 2, "string", False, None),
        ("bottom", 3, "string", True, None), ("top", 4, "string", True, None),
        ("phase", 10, "Phase", False, None), ("loss_weight", 5, "float", True, None),
        ("param", 6, "ParamSpec", True, None), ("propagate_down", 11, "bool", True, None),
        ("include", 8, "NetStateRule", True, None), ("exclude", 9, "NetStateRule", True, None),
        ("loss_param", 101, "LossParameter", False, None),
        ("accuracy_param", 102, "AccuracyParameter", False, None),
        ("inner_product_param", 117, "InnerProductParameter", False, None),
        ("relu_param", 123, "ReLUParameter", False, None),
        ("sigmoid_param", 124, "SigmoidParameter", False, None),
        ("softmax_param", 125, "SoftmaxParameter", False, None),
        ("tanh_param", 127, "TanHParameter", False, None),
        ("input_param", 143, "InputParameter", False, None),
        ("smooth_l1_loss_param", 8266712, "SmoothL1LossParameter", False, None)],
    "NetParameter": [
        ("name", 1, "string", False, None), ("input", 3, "string", True, None),
        ("input_shape", 8, "BlobShape", True, None), ("input_dim", 4, "int32", True, None),
        ("force_backward", 5, "bool", False, "false"), ("state", 6, "NetState", False, None),
        ("debug_info", 7, "bool", False, "false"), ("layer", 100, "LayerParameter", True, None)],
    "SolverParameter": [
        ("net", 24, "string", False, None), ("train_net", 1, "string", False, None),
        ("test_net", 2, "string", True, None), ("net_param", 25, "NetParameter", False, None),
        ("test_iter", 3, "int32", True, None), ("test_interval", 4, "int32", False, "0"),
        ("test_compute_loss", 19, "bool", False, "false"),
        ("test_initialization", 32, "bool", False, "true"),
        ("base_lr", 5, "float", False, None), ("display", 6, "int32", False, None),
        ("average_loss", 33, "int32", False, "1"), ("max_iter", 7, "int32", False, None),
        ("iter_size", 36, "int32", False, "1"), ("lr_policy", 8, "string", False, None),
        ("gamma", 9, "float", False, None), ("power", 10, "float", False, None),
        ("momentum", 11, "float", False, None), ("weight_decay", 12, "float", False, None),
        ("regularization_type", 29, "string", False, "L2"), ("stepsize", 13, "int32", False, None),
        ("stepvalue", 34, "int32", True, None), ("clip_gradients", 35, "float", False, "-1"),
        ("snapshot", 14, "int32", False, "0"), ("snapshot_prefix", 15, "string", False, None),
        ("snapshot_diff", 16, "bool", False, "false"),
        ("snapshot_format", 37, "SolverParameter.SnapshotFormat", False, "BINARYPROTO"),
        ("solver_mode", 17, "SolverParameter.SolverMode", False, "GPU"),
        ("device_id", 18, "int32", False, "0"), ("random_seed", 20, "int64", False, "-1"),
        ("type", 40, "string", False, "SGD"), ("delta", 31, "float", False, "1e-8"),
        ("momentum2", 39, "float", False, "0.999"), ("rms_decay", 38, "float", False, "0.99"),
        ("debug_info", 23, "bool", False, "false"),
        ("snapshot_after_train", 28, "bool", False, "true"),
        ("solver_type", 30, "SolverParameter.SolverType", False, "SGD")],
}

_FILE_NAME = "gpuloss/caffe_subset.proto"


@lru_cache(maxsize=None)
def _pool() -> descriptor_pool.DescriptorPool:
    fdp = descriptor_pb2.FileDescriptorProto(name=_FILE_NAME, package="caffe", syntax="proto2")
    nested_enums: dict[str, list] = {}
    for full, values in _ENUMS.items():
        owner, _, enum_name = full.rpartition(".")
        if owner:
            nested_enums.setdefault(owner, []).append((enum_name, values))
        else:
            e = fdp.enum_type.add(name=enum_name)
            for n, v in values:
                e.value.add(name=n, number=v)
    for msg_name, fields in _MESSAGES.items():
        m = fdp.message_type.add(name=msg_name)
        for enum_name, values in nested_enums.get(msg_name, []):
            e = m.enum_type.add(name=enum_name)
            for n, v in values:
                e.value.add(name=n, number=v)
        for name, number, typ, repeated, default in fields:
            f = m.field.add(name=name, number=number,
                            label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if typ in _SCALAR:
                f.type = _SCALAR[typ]
            elif typ in _ENUMS:
                f.type, f.type_name = _F.TYPE_ENUM, f".caffe.{typ}"
            else:
                f.type, f.type_name = _F.TYPE_MESSAGE, f".caffe.{typ}"
            if default is not None:
                f.default_value = default
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return pool


def message_class(name: str):
    """The generated message class ``caffe.<name>`` of the subset schema."""
    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"caffe.{name}"))


def NetParameter():  # noqa: N802 - named like the Caffe message it builds
    return message_class("NetParameter")()


def SolverParameter():  # noqa: N802
    return message_class("SolverParameter")()


class PrototxtError(ValueError):
    """A prototxt that does not parse, or asks for something gpuloss does not implement."""


class FieldError(PrototxtError, GraphError):
    """A field of a prototxt whose value gpuloss refuses, with the file and line: both a
    :class:`PrototxtError` (the text is at fault) and a :class:`GraphError` (the net or solver is)."""


def read_text(text_or_path) -> tuple[str, str]:
    """``(text, source)``: the file's text when given a path, else the text itself as ``<string>``.

    A :class:`os.PathLike` is always a path; a ``str`` is a path when such a file
    exists or it holds none of ``{``, ``:`` and a newline (the command line passes
    paths as ``Path`` so that a missing file is never read as text).
    """
    if isinstance(text_or_path, os.PathLike):
        path = os.fspath(text_or_path)
    elif isinstance(text_or_path, str) and (os.path.isfile(text_or_path)
                                           or not any(c in text_or_path for c in "{:\n")):
        path = text_or_path  # prototxt text always holds a ':' or a '{'; a path need not
    else:
        return str(text_or_path), "<string>"
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(), path
    except OSError as exc:
        raise PrototxtError(f"cannot read prototxt file {path!r}: {exc.strerror}") from None


_LAYER_START = re.compile(r"\blayers?\s*\{")
_NAME = re.compile(r'\bname\s*:\s*"([^"]*)"')
_TYPE = re.compile(r'\btype\s*:\s*"([^"]*)"')


def _enclosing_layer(text: str, line: int) -> tuple[str | None, str | None]:
    """Name and type of the ``layer { ... }`` block that holds 1-based ``line`` (for messages only)."""
    lines = text.splitlines(keepends=True)
    offset = sum(len(s) for s in lines[:max(line - 1, 0)])
    starts = [m.start() for m in _LAYER_START.finditer(text) if m.start() <= offset]
    if not starts:
        return None, None
    start = starts[-1]
    depth, end = 0, len(text)
    for i in range(text.index("{", start), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            end = i
            break
    if end < offset:  # the line lies after that layer closed: at net level
        return None, None
    block = text[start:end]
    # The layer's own name/type are its first at depth 1; a nested filler's `type` comes later,
    # so take the first match outside nested braces.
    depth1 = re.sub(r"\{[^{}]*\}", "", block[block.index("{") + 1:])
    while re.search(r"\{[^{}]*\}", depth1):
        depth1 = re.sub(r"\{[^{}]*\}", "", depth1)
    name, typ = _NAME.search(depth1), _TYPE.search(depth1)
    return (name.group(1) if name else None), (typ.group(1) if typ else None)


def _parse(text: str, source: str, msg, what: str, supported_types=()):
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        line, col = exc.GetLine(), exc.GetColumn()
        where = f"{source}:{line}:{col}" if line is not None else source
        detail = str(exc)
        detail = re.sub(r"^\d+:\d+ : ", "", detail)
        field = re.search(r'has no field named "([^"]+)"', detail)
        layer_name, layer_type = _enclosing_layer(text, line or 0) if line else (None, None)
        parts = [f"{where}: "]
        if layer_name is not None or layer_type is not None:
            parts.append(f"layer {layer_name!r} (type {layer_type!r}): ")
        if field:
            msg_type = re.search(r'Message type "caffe\.(\w+)"', detail)
            parts.append(f"field {field.group(1)!r} is not supported "
                         f"(gpuloss reads a subset of Caffe's {msg_type.group(1) if msg_type else what})")
            if layer_type is not None and supported_types and layer_type not in supported_types:
                parts.append(f"; unsupported layer type {layer_type!r}: gpuloss implements "
                             f"{', '.join(sorted(supported_types))}")
        else:
            parts.append(detail)
        raise PrototxtError("".join(parts)) from None
    return msg


def parse_net(text_or_path, supported_types=(), *, with_text: bool = False):
    """Parse a ``NetParameter`` prototxt; returns ``(message, source)`` (and the text with ``with_text``).
    Every float field must be finite (:class:`FieldError` naming the line otherwise)."""
    text, source = read_text(text_or_path)
    msg = _parse(text, source, NetParameter(), "NetParameter", supported_types)
    check_finite(msg, text, source)
    return (msg, source, text) if with_text else (msg, source)


def parse_solver(text_or_path, *, with_text: bool = False):
    """Parse a ``SolverParameter`` prototxt; returns ``(message, source)`` (and the text with ``with_text``).
    Every float field must be finite (:class:`FieldError` naming the line otherwise)."""
    text, source = read_text(text_or_path)
    msg = _parse(text, source, SolverParameter(), "SolverParameter")
    check_finite(msg, text, source)
    return (msg, source, text) if with_text else (msg, source)


# -- where a field is written: line numbers for errors found after parsing -------------------------

_TOKEN = re.compile(r"""#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[^\s{}<>:\[\],;#"']+|[{}<>:\[\],;]|\n""")


def field_path(field) -> tuple:
    """A field path as ``((name, index), ...)``: from a name, or names each optionally followed by an index
    (``("param", 1, "lr_mult")``: the second ``param`` block's ``lr_mult``)."""
    if field is None:
        return ()
    if isinstance(field, str):
        return ((field, 0),)
    out, items = [], list(field)
    i = 0
    while i < len(items):
        item = items[i]
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(item)
        elif isinstance(item, tuple):
            out.extend(field_path(item))
        elif isinstance(item, str):
            if i + 1 < len(items) and isinstance(items[i + 1], int) and not isinstance(items[i + 1], bool):
                out.append((item, items[i + 1]))
                i += 1
            else:
                out.append((item, 0))
        i += 1
    return tuple(out)


@lru_cache(maxsize=32)
def field_lines(text: str) -> dict:
    """``{((name, index), ...): line}`` for every field written in a prototxt text (1-based lines).

    ``index`` counts the occurrences of a name inside its enclosing message, so
    the path of the third layer's second ``param`` block's ``lr_mult`` is
    ``(("layer", 2), ("param", 1), ("lr_mult", 0))``, the same path a walk over
    the parsed message gives.
    """
    toks, line = [], 1
    for m in _TOKEN.finditer(text):
        t = m.group()
        if t == "\n":
            line += 1
        elif not t.startswith("#"):
            toks.append((t, line))
    lines: dict = {}
    stack = [((), Counter())]
    i, n = 0, len(toks)
    while i < n:
        t, ln = toks[i]
        if t in ("}", ">"):
            if len(stack) > 1:
                stack.pop()
            i += 1
            continue
        if not (t[0].isalpha() or t[0] == "_"):
            i += 1
            continue
        path, counts = stack[-1]
        j = i + 1
        if j < n and toks[j][0] == ":":
            j += 1
        if j < n and toks[j][0] in ("{", "<"):
            key = path + ((t, counts[t]),)
            counts[t] += 1
            lines.setdefault(key, ln)
            stack.append((key, Counter()))
            i = j + 1
        elif j < n and toks[j][0] == "[":
            j += 1
            while j < n and toks[j][0] != "]":
                if toks[j][0] != ",":
                    lines.setdefault(path + ((t, counts[t]),), toks[j][1])
                    counts[t] += 1
                j += 1
            i = j + 1
        else:
            lines.setdefault(path + ((t, counts[t]),), ln)
            counts[t] += 1
            i = j + 1
    return lines


def locate(text: str | None, source: str, path) -> str:
    """``source:line`` of the field at ``path`` (or of the nearest enclosing message written), else ``source``."""
    path = field_path(path)
    if text is None:
        return source
    lines = field_lines(text)
    while path:
        if path in lines:
            return f"{source}:{lines[path]}"
        path = path[:-1]
    return source


_F_FLOAT = (_F.TYPE_FLOAT, _F.TYPE_DOUBLE)


def _float_fields(msg, path=()):
    """``(path, value)`` of every float or double field set in ``msg``, nested messages included."""
    for fd, value in msg.ListFields():
        items = list(value) if fd.is_repeated else [value]
        if fd.type == _F.TYPE_MESSAGE:
            for k, sub in enumerate(items):
                yield from _float_fields(sub, path + ((fd.name, k),))
        elif fd.type in _F_FLOAT:
            for k, v in enumerate(items):
                yield path + ((fd.name, k),), v


def _dotted(path, msg) -> str:
    """``inner_product_param.weight_filler.value`` / ``param[1].lr_mult`` / ``loss_weight[1]``."""
    parts = []
    for name, k in path:
        fd = msg.DESCRIPTOR.fields_by_name[name]
        parts.append(f"{name}[{k}]" if fd.is_repeated else name)
        if fd.type == _F.TYPE_MESSAGE:
            msg = getattr(msg, name)[k] if fd.is_repeated else getattr(msg, name)
    return ".".join(parts)


def check_finite(msg, text: str, source: str) -> None:
    """Every float field of a parsed message must be finite: NaN or inf (or a float that overflows to
    inf, such as ``1e39``) in a learning rate, loss weight or filler only ever produces NaN later."""
    for path, value in _float_fields(msg):
        if math.isfinite(value):
            continue
        where, sub = locate(text, source, path), msg
        prefix = ""
        if path[0][0] == "layer":
            lp = msg.layer[path[0][1]]
            prefix = f"layer {lp.name or '<unnamed>'!r} (type {lp.type!r}): "
            path, sub = path[1:], lp
        raise FieldError(f"{where}: {prefix}field {_dotted(path, sub)!r} must be a finite number, got {value}",
                         field=path)
