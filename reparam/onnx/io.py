"""Loading, validating and saving ONNX models, with clear one-line errors and atomic writes.

Saving never leaves a partial file: the model (and its external-data file) are written into a temporary
directory next to the destination and moved into place only once complete.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, Message
from onnx import TensorProto, numpy_helper

from .errors import OnnxModelError, one_line

MIN_OPSET = 13
MAX_OPSET = 21
# protobuf cannot serialize a message of 2 GiB or more; above this the model must use external data
PROTOBUF_LIMIT = 2**31 - 2**20
# tensors of at least this many bytes go to the external-data file when one is written
EXTERNAL_THRESHOLD = 1024
# element types stored several to a byte (their raw data size is not itemsize * count)
_PACKED = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(TensorProto, n)}


@dataclass
class Loaded:
    """A model with where it came from: ``path`` is None for an in-memory ModelProto."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool


def read_model(source: str | os.PathLike | onnx.ModelProto) -> Loaded:
    """Read ``source`` (a path, or a ModelProto used as is and never modified), external data included."""
    if isinstance(source, onnx.ModelProto):
        external = _uses_external_data(source)
        if external and _has_unloaded_external_data(source):
            raise OnnxModelError("the ModelProto references external data that is not loaded; pass the file "
                                 "path instead, or call onnx.load_external_data_for_model first")
        return Loaded(source, None, external)
    if not isinstance(source, (str, os.PathLike)):
        raise OnnxModelError(f"expected an onnx.ModelProto or a path, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise OnnxModelError(f"cannot read {str(path)!r}: no such file")
    if path.is_dir():
        raise OnnxModelError(f"{str(path)!r} is a directory, not an ONNX model file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise OnnxModelError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    if not data:
        raise OnnxModelError(f"{str(path)!r} is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise OnnxModelError(f"{str(path)!r} is not an ONNX model, or is truncated or corrupt "
                             f"(protobuf: {one_line(err, 120)})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise OnnxModelError(f"{str(path)!r} is not an ONNX model (no graph or no opset_import; "
                             "truncated or another file format?)")
    external = _uses_external_data(model)
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as err:
            raise OnnxModelError(f"cannot load the external data of {str(path)!r}: {one_line(err, 200)}") from None
    return Loaded(model, path, external)


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model with its external data; raises OnnxModelError with a one-line reason."""
    return read_model(source).model


def _all_tensors(model: onnx.ModelProto):
    return onnx.external_data_helper._get_all_tensors(model)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) for t in _all_tensors(model))


def _has_unloaded_external_data(model: onnx.ModelProto) -> bool:
    return any(onnx.external_data_helper.uses_external_data(t) and not t.HasField("raw_data")
               for t in _all_tensors(model))


def default_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset, refused unless within [MIN_OPSET, MAX_OPSET]."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise OnnxModelError("the model imports no default-domain ONNX opset")
    v = versions[0]
    if not MIN_OPSET <= v <= MAX_OPSET:
        raise OnnxModelError(f"unsupported opset {v} for the default ONNX domain (supported: {MIN_OPSET} to "
                             f"{MAX_OPSET}; convert with onnx.version_converter first)")
    return v


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes, as far as the 2 GiB protobuf limit is concerned.

    Tensor payloads dominate, and summing their lengths is far cheaper than protobuf's ``ByteSize`` (which
    walks every field: seconds on a 500 MB model); near the limit the exact size is computed.
    """
    payload = 0
    for t in _all_tensors(model):
        payload += len(t.raw_data) + 4 * len(t.float_data) + 8 * (len(t.double_data) + len(t.int64_data)) \
            + 4 * len(t.int32_data)
    if abs(payload - PROTOBUF_LIMIT) < 64 * 2**20 or payload > PROTOBUF_LIMIT:
        return model.ByteSize()
    return payload


_CHECK_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError)
_NODE_IN_ERROR = re.compile(r"\(op_type:([^,]*), node name: ([^)]*)\):\s*")
_ERROR_TAG = re.compile(r"^(\[\w+Error\]\s*|Inference error\(s\):\s*)+")


def describe_check_error(err: BaseException) -> str:
    """The checker's or shape inference's message on one line, naming the node first when it names one."""
    text = one_line(err, 4000)
    m = _NODE_IN_ERROR.search(text)
    if m is None:
        return one_line(_ERROR_TAG.sub("", text), 300)
    op, name = m.group(1).strip(), m.group(2).strip()
    rest = _ERROR_TAG.sub("", text[m.end():]).split(" (op_type:")[0]  # the first error; later ones follow from it
    where = f"node {name!r} ({op})" if name else f"an unnamed {op} node"
    return one_line(f"{where}: {rest}", 300)


def validate(model: onnx.ModelProto, what: str = "invalid ONNX model") -> dict[str, bytes]:
    """Reject what ``onnx.checker.check_model(full_check=True)`` or strict, type-checking shape inference
    (with data propagation) rejects, with one line naming the node.

    Both run on the weight-free :func:`skeleton`, so the cost does not grow with the weights and models
    past the 2 GiB protobuf limit are checked too; the weights themselves are checked by
    :func:`check_payloads`.  Returns the raw payloads that check read (see there).
    """
    payloads = check_payloads(model)
    check_skeleton(skeleton(model), what)
    return payloads


def check_skeleton(light: onnx.ModelProto, what: str = "invalid ONNX model") -> None:
    """:func:`validate` on a model already reduced by :func:`skeleton`."""
    problem = strict_problem(light)
    if problem is not None:
        raise OnnxModelError(f"{what}: {problem}")


def strict_problem(light: onnx.ModelProto) -> str | None:
    """Why the full checker or strict shape inference rejects ``light`` (one line), or None."""
    try:
        onnx.checker.check_model(light, full_check=True)
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except _CHECK_ERRORS as err:
        return describe_check_error(err)
    return None


def runtime_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers that are also graph inputs: defaults a caller may override, so runtime inputs."""
    inputs = {i.name for i in model.graph.input}
    return [t.name for t in model.graph.initializer if t.name in inputs]


def check_payloads(model: onnx.ModelProto) -> dict[str, bytes]:
    """Main-graph initializers the skeleton leaves out: their data must fill their shape, and one that is
    also a graph input (a default the caller may override) must match that input's declared type.

    Returns the ``raw_data`` read on the way, by tensor name: protobuf copies the bytes on every read, so
    the frontend reads weights from these instead of copying them a second time.
    """
    declared = {i.name: i for i in model.graph.input}
    payloads: dict[str, bytes] = {}
    for t in model.graph.initializer:
        if _is_small(t):
            continue  # kept in the skeleton: the checker sees it
        if t.data_type == TensorProto.STRING or t.data_type in _PACKED:
            onnx.checker.check_tensor(t)
        elif t.HasField("raw_data"):
            want = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            raw = payloads[t.name] = t.raw_data
            if len(raw) != want:
                raise OnnxModelError(f"invalid ONNX model: initializer {t.name!r} has {len(raw)} bytes of "
                                     f"data for shape {list(t.dims)} ({want} expected)")
        else:
            try:
                onnx.checker.check_tensor(t)
            except onnx.checker.ValidationError as err:
                raise OnnxModelError(f"invalid ONNX model: initializer {t.name!r}: {one_line(err)}") from None
        vi = declared.get(t.name)
        if vi is not None:
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            same_shape = not tt.HasField("shape") or (
                len(dims) == len(t.dims) and all(d is None or d == e for d, e in zip(dims, t.dims)))
            if tt.elem_type != t.data_type or not same_shape:
                raise OnnxModelError(f"invalid ONNX model: initializer {t.name!r} (shape {list(t.dims)}) does not "
                                     f"match the graph input of that name")
    return payloads


def _copy_fields(src: Message, dst: Message, skip: set[str]) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        target = getattr(dst, field.name)
        if isinstance(value, Message):
            target.CopyFrom(value)
        elif hasattr(value, "extend"):
            target.extend(value)
        else:
            setattr(dst, field.name, value)


def _nbytes(t: TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 1
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def _is_small(t: TensorProto) -> bool:
    return t.data_type in (TensorProto.INT64, TensorProto.INT32) or int(np.prod(t.dims)) < EXTERNAL_THRESHOLD


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its large main-graph weights: each becomes a graph input of the same
    type and shape.

    The checker and shape inference need the types and shapes of weights, not their values, so this avoids
    copying (or serializing past the protobuf limit) the weights of a large model.  Small and integer
    tensors stay inline initializers for data propagation (Reshape targets, pads).
    """
    light = onnx.ModelProto()
    _copy_fields(model, light, {"graph"})
    _copy_fields(model.graph, light.graph, {"initializer"})
    declared = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if _is_small(t):
            light.graph.initializer.append(t)
        elif t.name not in declared:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _tensor_bytes(t: TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    arr = numpy_helper.to_array(t)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


def _write_external(model: onnx.ModelProto, path: Path, location: str) -> onnx.ModelProto:
    """Write large main-graph initializers to ``location`` beside ``path``; returns the model referencing it.

    Builds a new ModelProto whose small tensors are shared copies; ``model`` itself is not modified.
    """
    light = onnx.ModelProto()
    _copy_fields(model, light, {"graph"})
    _copy_fields(model.graph, light.graph, {"initializer"})
    big = [t.data_type != TensorProto.STRING and _nbytes(t) >= EXTERNAL_THRESHOLD for t in model.graph.initializer]
    if not any(big):
        return model
    offset = 0
    with open(path.parent / location, "wb") as fh:
        for t, is_big in zip(model.graph.initializer, big):
            if not is_big:
                light.graph.initializer.append(t)
                continue
            data = _tensor_bytes(t)
            pad = (-offset) % 4096
            fh.write(b"\0" * pad)
            offset += pad
            fh.write(data)
            ref = TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
            ref.data_location = TensorProto.EXTERNAL
            ref.external_data.add(key="location", value=location)
            ref.external_data.add(key="offset", value=str(offset))
            ref.external_data.add(key="length", value=str(len(data)))
            light.graph.initializer.append(ref)
            offset += len(data)
    return light


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> list[Path]:
    """Save ``model`` atomically to ``path``; returns the files written.

    ``external_data``: True writes weights to ``<name>.data`` next to the model, False never does, None
    (default) does so only when the model is too large for one protobuf file.  ``model`` is not modified.
    """
    path = Path(path)
    if external_data is None:
        external_data = model_size(model) >= PROTOBUF_LIMIT
    tmp = stage_model(model, path, external_data=external_data)
    try:
        return commit_staged(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stage_model(model: onnx.ModelProto, path: Path, *, external_data: bool) -> Path:
    """Write the model (and its data file) into a fresh temporary directory beside ``path``; returns it."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxModelError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".reparam-", dir=parent))
    except OSError as err:
        raise OnnxModelError(f"cannot write into {str(parent)!r}: {err.strerror or err}") from None
    try:
        staged = tmp / path.name
        if external_data:
            out = _write_external(model, staged, path.name + ".data")
        else:
            if model_size(model) >= PROTOBUF_LIMIT:
                raise OnnxModelError("the model exceeds the 2 GiB protobuf limit; save it with external data")
            out = model
        with open(staged, "wb") as fh:
            fh.write(out.SerializeToString())
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OnnxModelError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def staged_file(tmp: Path, path: Path) -> Path:
    """Where :func:`stage_model` put the model for destination ``path``."""
    return tmp / Path(path).name


def commit_staged(tmp: Path, path: Path) -> list[Path]:
    """Move the staged files into place (data file first, so the model never points at a missing file)."""
    path = Path(path)
    written = []
    names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == path.name)
    for name in names:
        dest = path.parent / name
        try:
            os.replace(tmp / name, dest)
        except OSError as err:
            raise OnnxModelError(f"cannot write {str(dest)!r}: {err.strerror or err}") from None
        written.append(dest)
    return written


__all__ = [
    "MAX_OPSET",
    "MIN_OPSET",
    "Loaded",
    "check_payloads",
    "commit_staged",
    "default_opset",
    "describe_check_error",
    "load_model",
    "read_model",
    "save_model",
    "skeleton",
    "stage_model",
    "staged_file",
    "validate",
]
