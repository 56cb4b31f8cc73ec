"""Check an input model before anything is built from it.

    validated = check_model(Path("model.onnx"), workdir)  # raises InvalidModel

The model must parse, pass ``onnx.checker``, use a default-domain opset in the supported
range, and keep any external data inside its own folder: no absolute paths, no ``..``, no
symlink that leads out. A model with external data is rewritten as one self-contained file
(the artifact is a single file).

tierserve serves tensors. A classifier converted by skl2onnx with its defaults ends in a
``ZipMap`` (probabilities as a sequence of maps, one per row): that output is served as the
probability tensor the ZipMap reads, ``FP32 [-1, classes]``, under the same name, its columns
in the order of the classifier's classes (the report says so). A ZipMap that cannot be
turned into a tensor this way is refused with the export option that avoids it
(``zipmap=False``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from tierserve.tools.packaging._errors import InvalidModel

MIN_OPSET = 7
ML_DOMAIN = "ai.onnx.ml"
NO_ZIPMAP = (
    "convert the classifier with skl2onnx's options={id(model): {'zipmap': False}} (or "
    "to_onnx(..., options={'zipmap': False})) so it outputs a probability tensor"
)
# onnx refuses to serialize a protobuf over 2 GB; the artifact is one file.
MAX_SINGLE_FILE_BYTES = 2 * 1024**3 - 64 * 1024**2


def max_opset() -> int:
    """The newest default-domain opset the pinned onnx (and so onnxruntime) knows."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


@dataclass(frozen=True)
class ValidatedModel:
    """A model that passed :func:`check_model`; ``path`` is one self-contained file."""

    path: Path
    source: Path
    opset: int | None
    op_types: tuple[str, ...]
    external_files: tuple[Path, ...]
    notes: tuple[str, ...] = ()

    def describe_ops(self, limit: int = 8) -> str:
        shown = ", ".join(self.op_types[:limit])
        return shown + (f" and {len(self.op_types) - limit} more" if len(self.op_types) > limit else "")


def check_model(path: Path, workdir: Path) -> ValidatedModel:
    """Validate ``path``; a model with external data is copied into ``workdir`` as one file.

    Raises:
        InvalidModel: with a one-line reason and what to do.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path} does not exist or is not a file: give the path of an .onnx model")
    if path.suffix == ".ort":
        raise InvalidModel(f"{path} is in ORT format: package the .onnx it was made from (add --format ort)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise InvalidModel(f"{path} is not an ONNX model ({_first_line(error)}): export it again") from None
    if not model.graph.node and not model.graph.output:
        raise InvalidModel(f"{path} is not an ONNX model (no graph in it): export it again")
    external = _check_external_data(model, path)
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as error:
        raise InvalidModel(
            f"{path} fails the ONNX checker ({_first_line(error)}): fix the export, or re-export with a newer exporter"
        ) from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = max_opset()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise InvalidModel(
            f"{path} uses opset {opset}; tierserve supports opsets {MIN_OPSET} to {newest}: convert it with "
            "onnx.version_converter.convert_version(model, 17) or re-export with that opset"
        )
    op_types = tuple(
        sorted({f"{n.op_type} ({n.domain})" if n.domain else n.op_type for n in _nodes(model.graph)})
    )
    working = path
    if external:
        working = _materialize(path, workdir, external)
    working, notes = _tensors_for_zipmaps(working, workdir)
    return ValidatedModel(working, path, opset, op_types, tuple(external), notes)


def _tensors_for_zipmaps(path: Path, workdir: Path) -> tuple[Path, tuple[str, ...]]:
    """``path`` with each ZipMap that makes a graph output removed, its probability tensor
    becoming that output (see the module docstring), written to ``workdir``; ``path`` itself
    when it has none.

    Raises:
        InvalidModel: a ZipMap output that cannot be served as its tensor; names ``zipmap=False``.
    """
    import onnx

    model = onnx.load(str(path))
    outputs = {output.name: output for output in model.graph.output}
    zipmaps = [
        node
        for node in model.graph.node
        if node.op_type == "ZipMap" and node.domain == ML_DOMAIN and node.output[0] in outputs
    ]
    if not zipmaps:
        return path, ()
    notes = []
    for node in zipmaps:
        name, source = node.output[0], node.input[0]
        classes = next(
            (len(a.ints) or len(a.strings) for a in node.attribute if a.name.startswith("classlabels_")), 0
        )
        why = _why_not_unzippable(model, name, source)
        if why:
            raise InvalidModel(
                f"{path}: output {name!r} is a ZipMap (a sequence of maps, one per row), {why}: {NO_ZIPMAP}"
            )
        model.graph.node.remove(node)
        for other in model.graph.node:
            other.output[:] = [name if item == source else item for item in other.output]
            other.input[:] = [name if item == source else item for item in other.input]
        for info in model.graph.value_info:
            if info.name == source:
                model.graph.value_info.remove(info)
                break
        outputs[name].type.CopyFrom(
            onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [None, classes or None])
        )
        notes.append(
            f"output {name!r} was a ZipMap (a sequence of maps, one per row): it is served as its "
            f"probability tensor, FP32 [-1, {classes or -1}], columns in the order of the classifier's "
            "classes (to keep the maps out of the model, convert with skl2onnx's zipmap=False)"
        )
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as error:
        raise InvalidModel(
            f"{path}: its ZipMap outputs cannot be served as tensors ({_first_line(error)}): {NO_ZIPMAP}"
        ) from None
    target = workdir / "tensors.onnx"
    onnx.save(model, str(target))
    return target, tuple(notes)


def _why_not_unzippable(model: Any, name: str, source: str) -> str:
    """Why the ZipMap from ``source`` to graph output ``name`` cannot give way to ``source``, or ''."""
    if any(name in node.input for node in model.graph.node):
        return "which other nodes read"
    if any(
        source == item.name for item in (*model.graph.input, *model.graph.output, *model.graph.initializer)
    ):
        return "whose probabilities are a graph input, output or initializer"
    if sum(source in node.output for node in model.graph.node) != 1:
        return "whose probabilities no single node makes"
    return ""


def _check_external_data(model: Any, path: Path) -> list[Path]:
    """Every external data file, resolved; refuses any location that leaves the model's folder."""
    from onnx import TensorProto

    folder = path.parent.resolve()
    files: dict[Path, int] = {}
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        refused = _unsafe_location(location)
        if refused:
            raise InvalidModel(
                f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, {refused}: external data must "
                "be a file inside the model's folder; re-save it with onnx.save(..., location='weights.bin')"
            )
        target = (path.parent / location).resolve()
        if not target.is_relative_to(folder):
            raise InvalidModel(
                f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, which resolves outside the model's "
                "folder (a symlink?): copy the data file next to the model"
            )
        if not target.is_file():
            raise InvalidModel(
                f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, which is missing: copy it next "
                "to the model"
            )
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        files[target] = max(files.get(target, 0), end)
    for target, end in files.items():
        if end > target.stat().st_size:
            raise InvalidModel(
                f"{path}: external data file {target.name} is shorter than the model says: re-export it"
            )
    return sorted(files)


def _unsafe_location(location: str) -> str:
    if not location:
        return "an empty location"
    if "\x00" in location:
        return "a location with a NUL byte"
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or location.startswith(("/", "\\", "~")):
        return "an absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "a path with '..'"
    return ""


def _materialize(path: Path, workdir: Path, external: list[Path]) -> Path:
    import onnx

    if path.stat().st_size + sum(p.stat().st_size for p in external) > MAX_SINGLE_FILE_BYTES:
        raise InvalidModel(
            f"{path} is over 2 GB with its external data; tierserve stores a model as one file: "
            "quantize it first (e.g. to int8) or serve it from your own container"
        )
    model = onnx.load(str(path), load_external_data=True)
    for tensor in _tensors(model.graph):
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    target = workdir / "source.onnx"
    onnx.save(model, str(target))
    return target


def _nodes(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in _subgraphs(attribute):
                yield from _nodes(sub)


def _subgraphs(attribute: Any) -> list[Any]:
    graphs = list(attribute.graphs)
    if attribute.HasField("g"):
        graphs.append(attribute.g)
    return graphs


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in _subgraphs(attribute):
                yield from _tensors(sub)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
