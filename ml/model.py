"""The ONNX plug-in contract, model loading and scoring.

A model is any ONNX classifier that declares, in the model's
``metadata_props``:

=====================  =========================================================
``ublkml.kind``        ``fail_slow`` (reads I/O features) or ``failure`` (reads
                       SMART and I/O error features)
``ublkml.features``    comma-separated, ordered names from
                       :data:`ml.features.FEATURE_NAMES`: column ``i`` of the
                       input is feature ``i``
``ublkml.output``      what the score means, in words (e.g. "probability that
                       the path is fail-slow")
``ublkml.threshold``   a score at or above it flags the path (0 < t <= 1)
``ublkml.version``     the model's version (no spaces)
=====================  =========================================================

and has exactly one input, float32 of shape ``[N, len(features)]`` with ``N``
dynamic.  The score is taken from, in this order: an output named
``probabilities`` (float32 ``[N, 2]``: column 1, as skl2onnx exports a binary
classifier with ``zipmap=False``), or the only float32 output of shape
``[N]``, ``[N, 1]`` or ``[N, 2]`` (column 1).  Scores must lie in [0, 1].

:func:`load_model` checks all of that (with ``onnx.checker`` when the ``onnx``
package is installed, and always with onnxruntime and a trial run on a
zero batch) and raises :class:`ModelError` with one line saying what is
wrong.  Scoring runs onnxruntime on the CPU with one thread: the scorer runs
next to the queue threads and must not compete with them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.features import FEATURE_NAMES, IO_FEATURES, SMART_FEATURES
from ublk_driver.core.errors import UblkError

KINDS = ("fail_slow", "failure")
META_KEYS = ("ublkml.kind", "ublkml.features", "ublkml.output", "ublkml.threshold",
             "ublkml.version")
MAX_MODEL_BYTES = 64 << 20
#: the largest tensor a model may declare or build from constant shapes (256 MiB of float32)
MAX_TENSOR_ELEMENTS = 1 << 26
MODELS_DIR = os.path.join(os.path.dirname(__file__), "models")
#: the models shipped in the package, by kind (made by ``python -m ml.train reference``)
REFERENCE_MODELS = {"fail_slow": os.path.join(MODELS_DIR, "fail_slow.onnx"),
                    "failure": os.path.join(MODELS_DIR, "failure.onnx")}
#: the packaged drive model: fail_slow, trained on real fleet telemetry (docs/models.md,
#: "Fail-slow detection over telemetry"); judges a drive against its peers' or its own
#: latency-vs-throughput curve (ml.features ``fit_*``)
DRIVE_MODEL = os.path.join(MODELS_DIR, "drive_fail_slow.onnx")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class ModelError(UblkError, ValueError):
    """A model file breaks the plug-in contract, or scoring it failed."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model declares, and where its score comes from."""

    path: str
    kind: str
    features: tuple[str, ...]
    output: str
    threshold: float
    version: str
    sha256: str
    input_name: str
    score_output: str
    score_column: int  # -1: the output is [N] or [N, 1]
    #: metadata_props beyond the contract's keys (e.g. ``ublkml.drive_quantile``)
    extra: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "features": list(self.features),
                "output": self.output, "threshold": self.threshold, "version": self.version,
                "sha256": self.sha256}


def parse_metadata(meta: dict[str, str], where: str) -> tuple[str, tuple[str, ...], str, float,
                                                              str]:
    """(kind, features, output, threshold, version) from ``metadata_props``."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ModelError(f"{where}: metadata_props lacks {', '.join(missing)} "
                         "(see docs/models.md for the contract)")
    kind = meta["ublkml.kind"].strip()
    if kind not in KINDS:
        raise ModelError(f"{where}: ublkml.kind must be one of {', '.join(KINDS)}, "
                         f"got {kind!r}")
    names = tuple(n.strip() for n in meta["ublkml.features"].split(","))
    if not names or any(not n for n in names):
        raise ModelError(f"{where}: ublkml.features must be comma-separated feature names, "
                         f"got {meta['ublkml.features']!r}")
    unknown = [n for n in names if n not in FEATURE_NAMES]
    if unknown:
        raise ModelError(f"{where}: unknown feature(s) {', '.join(map(repr, unknown))} "
                         "(known: see ml.features.FEATURE_NAMES)")
    if len(set(names)) != len(names):
        raise ModelError(f"{where}: ublkml.features lists a feature twice")
    allowed = IO_FEATURES if kind == "fail_slow" else SMART_FEATURES + IO_FEATURES
    wrong = [n for n in names if n not in allowed]
    if wrong:
        raise ModelError(f"{where}: a {kind} model cannot use {', '.join(wrong)}")
    output = meta["ublkml.output"].strip()
    if not output:
        raise ModelError(f"{where}: ublkml.output must say what the score means")
    try:
        threshold = float(meta["ublkml.threshold"])
    except ValueError:
        raise ModelError(f"{where}: ublkml.threshold must be a number, "
                         f"got {meta['ublkml.threshold']!r}") from None
    if not (math.isfinite(threshold) and 0 < threshold <= 1):
        raise ModelError(f"{where}: ublkml.threshold must be in (0, 1], got {threshold}")
    version = meta["ublkml.version"].strip()
    if not _VERSION.match(version):
        raise ModelError(f"{where}: ublkml.version must be a short word without spaces, "
                         f"got {version!r}")
    return kind, names, output, threshold, version


def _onnx_check(data: bytes, where: str) -> None:
    """The onnx package's structural checks, when it is installed (extra `train`)."""
    try:
        import onnx
    except ImportError:
        return  # onnxruntime's own load below still validates the graph
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelError(f"{where}: not an ONNX model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'cannot parse'})") from None
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ModelError(f"{where}: the ONNX checker refuses it: "
                         f"{_first_line(e)}") from None
    _check_sizes(proto, where)


def _check_sizes(proto: Any, where: str) -> None:
    """Refuse tensors declared (or built from constant shapes) beyond MAX_TENSOR_ELEMENTS.

    onnxruntime allocates what a graph asks for: a ConstantOfShape of 2^33
    floats is 32 GiB taken from the machine the device runs on, at the trial
    run or at the first scoring tick.  Shapes computed at run time from the
    input cannot be seen here; those built from initializers can.
    """
    from onnx import numpy_helper

    graph = proto.graph
    consts = {t.name: t for t in graph.initializer}

    def check(count: int, what: str) -> None:
        if count > MAX_TENSOR_ELEMENTS:
            raise ModelError(f"{where}: {what} has {count} elements, more than the "
                             f"{MAX_TENSOR_ELEMENTS} a scoring model may use")

    for t in graph.initializer:
        check(math.prod(t.dims), f"initializer {t.name!r}")
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        check(math.prod(dims), f"tensor {vi.name!r}")
    for node in graph.node:
        shape_input = {"ConstantOfShape": 0, "Expand": 1, "Tile": 1}.get(node.op_type)
        if shape_input is None or len(node.input) <= shape_input:
            continue
        t = consts.get(node.input[shape_input])
        if t is None or math.prod(t.dims) > 16:
            continue
        try:
            count = math.prod(abs(int(v)) for v in numpy_helper.to_array(t).reshape(-1))
        except (ValueError, TypeError):
            continue  # the checker or onnxruntime will refuse it
        check(count, f"{node.op_type} node {node.name or node.output[0]!r}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _dims(shape: Any) -> list[Any]:
    return list(shape) if isinstance(shape, (list, tuple)) else []


class Model:
    """A validated model and its onnxruntime session.  Thread-safe for scoring."""

    def __init__(self, info: ModelInfo, session: Any) -> None:
        self.info = info
        self._session = session

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def features(self) -> tuple[str, ...]:
        return self.info.features

    @property
    def threshold(self) -> float:
        return self.info.threshold

    def score(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Scores in [0, 1] for a [N, len(features)] float32 batch."""
        nf = len(self.info.features)
        if x.ndim != 2 or x.shape[1] != nf:
            raise ModelError(f"input must be [N, {nf}], got {list(x.shape)}")
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        try:
            out = self._session.run([self.info.score_output], {self.info.input_name: x})[0]
        except Exception as e:
            raise ModelError(f"{self.info.path}: scoring failed: {_first_line(e)}") from None
        s = np.asarray(out, dtype=np.float32)
        # The declared output shape is a promise the graph need not keep (a
        # constant [1], an empty tensor): check what came back, not what was said.
        n = x.shape[0]
        want = ((n, 2),) if self.info.score_column >= 0 else ((n,), (n, 1))
        if s.shape not in want:
            raise ModelError(f"{self.info.path}: output {self.info.score_output!r} has shape "
                             f"{list(s.shape)} for a batch of {n}; expected "
                             f"{' or '.join(str(list(w)) for w in want)}")
        s = s[:, self.info.score_column] if self.info.score_column >= 0 else s.reshape(n)
        if not np.all((s >= 0) & (s <= 1)):  # also catches NaN
            raise ModelError(f"{self.info.path}: scores outside [0, 1] "
                             f"(min {np.nanmin(s) if s.size else 0}); "
                             "the output must be a probability")
        return s

    def predict(self, x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32],
                                                           npt.NDArray[np.bool_]]:
        """(scores, flags): flags are scores at or above the model's threshold."""
        s = self.score(x)
        return s, s >= self.info.threshold


def _session(data: bytes, where: str) -> Any:
    import onnxruntime as ort  # type: ignore[import-untyped,unused-ignore]

    ort.set_default_logger_severity(4)  # errors too: ModelError says it in one line
    opts = ort.SessionOptions()
    # One thread, no spinning: the scorer shares the machine with queue threads.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"{where}: onnxruntime cannot load it: {_first_line(e)}") from None


def load_model_bytes(data: bytes, where: str = "<bytes>", expect_kind: str | None = None) -> Model:
    """Validate a serialized model against the contract and open a session."""
    if not data:
        raise ModelError(f"{where}: empty file, not an ONNX model")
    _onnx_check(data, where)
    sess = _session(data, where)
    try:
        return _bind_contract(sess, data, where, expect_kind)
    except UnicodeDecodeError as e:
        # protobuf strings need not be UTF-8 on the wire; onnxruntime passes
        # them on as they are and pybind11 decodes them on access (names, metadata).
        raise ModelError(f"{where}: a name or metadata string is not UTF-8 "
                         f"({e.reason} at byte {e.start}); the file is damaged") from None


def _bind_contract(sess: Any, data: bytes, where: str, expect_kind: str | None) -> Model:
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    inputs = sess.get_inputs()
    outputs = sess.get_outputs()
    kind, names, output, threshold, version = parse_metadata(meta, where)
    if expect_kind is not None and kind != expect_kind:
        raise ModelError(f"{where}: a {kind} model, {expect_kind} expected")
    if len(inputs) != 1:
        raise ModelError(f"{where}: needs exactly one input, has {len(inputs)}")
    inp = inputs[0]
    if inp.type != "tensor(float)":
        raise ModelError(f"{where}: input {inp.name!r} must be float32, is {inp.type}")
    dims = _dims(inp.shape)
    if len(dims) != 2 or isinstance(dims[0], int) or dims[1] != len(names):
        raise ModelError(f"{where}: input {inp.name!r} must have shape [N, {len(names)}] "
                         f"with N dynamic (one column per declared feature), has {dims}")
    for o in outputs:
        if o.type.startswith(("seq(", "map(")):
            raise ModelError(f"{where}: output {o.name!r} is a {o.type}: export the "
                             "classifier without ZipMap (skl2onnx: options={'zipmap': False})")
    cands = [o for o in outputs if o.name == "probabilities"] or [
        o for o in outputs if o.type == "tensor(float)"]
    if not cands:
        raise ModelError(f"{where}: no float32 output to take a score from")
    if len(cands) > 1:
        raise ModelError(f"{where}: {len(cands)} float32 outputs; name the score "
                         "'probabilities' to say which")
    out = cands[0]
    if out.type != "tensor(float)":
        raise ModelError(f"{where}: output {out.name!r} must be float32, is {out.type}")
    odims = _dims(out.shape)
    if len(odims) == 1 or (len(odims) == 2 and odims[1] == 1):
        column = -1
    elif len(odims) == 2 and odims[1] == 2:
        column = 1
    else:
        raise ModelError(f"{where}: output {out.name!r} must be [N], [N, 1] or [N, 2] "
                         f"(probability of class 1 in column 1), has {odims}")
    info = ModelInfo(path=where, kind=kind, features=names, output=output, threshold=threshold,
                     version=version, sha256=hashlib.sha256(data).hexdigest(),
                     input_name=inp.name, score_output=out.name, score_column=column,
                     extra=tuple(sorted((k, v) for k, v in meta.items()
                                        if k not in META_KEYS)))
    model = Model(info, sess)
    # A trial run catches what static shapes do not say (e.g. a fixed batch size
    # inside the graph, or raw scores instead of probabilities).
    model.score(np.zeros((2, len(names)), dtype=np.float32))
    return model


def load_model(path: str | os.PathLike[str], expect_kind: str | None = None) -> Model:
    """Load and validate a model file; :class:`ModelError` says what is wrong."""
    where = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO must not hang `model validate`; it is refused below.
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                # /dev/zero has size 0 and never ends: read() would eat all memory.
                raise ModelError(f"{where}: not a regular file; give the path of an .onnx file")
            if st.st_size > MAX_MODEL_BYTES:
                raise ModelError(f"{where}: {st.st_size} bytes, larger than the "
                                 f"{MAX_MODEL_BYTES >> 20} MiB a scoring model may have")
            data = f.read(MAX_MODEL_BYTES + 1)  # bounded even if the file grows meanwhile
    except OSError as e:
        raise ModelError(f"{where}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_MODEL_BYTES:
        raise ModelError(f"{where}: larger than the {MAX_MODEL_BYTES >> 20} MiB a scoring "
                         "model may have")
    return load_model_bytes(data, where, expect_kind)


def drive_model() -> Model:
    """The packaged drive model (:data:`DRIVE_MODEL`): what ``ublkml ml detect`` uses
    on drive telemetry by default."""
    return load_model(DRIVE_MODEL, expect_kind="fail_slow")


def reference_model(kind: str = "fail_slow") -> Model:
    """The model shipped in the package for ``kind``."""
    if kind not in REFERENCE_MODELS:
        raise ModelError(f"no reference model of kind {kind!r}")
    return load_model(REFERENCE_MODELS[kind], expect_kind=kind)
