"""The GGUF write path: stream a source's tensors into a ``.gguf`` file.

The header, key/values and tensor infos are written first (every tensor's
type and byte size is known from its plan), then each tensor is read,
encoded in 1M-element chunks into one output buffer (by two worker threads,
with :mod:`modelkit.io.ggml`'s kernels, byte-identical to ggml's reference)
and written, so memory stays at a few times the largest tensor. Each lossy
tensor's error against its input is measured from the same chunks
(:class:`GGUFQuality`). Data goes to a hidden temp file beside the target
that is renamed over it only on success.

Which type and shape each tensor gets is a *plan* (:class:`TensorPlan`),
chosen by a planner: :func:`plain_plan` here, or a family's policy
(:func:`modelkit.convert.gguf.plan_tensors`).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkit.errors import CancelFlag, ModelkitError
from modelkit.io.ggml import GGML_TYPES
from modelkit.io.header import TensorInfo
from modelkit.io.source import Source, source_label
from modelkit.io.writer import atomic_path
from modelkit.progress import Progress, ProgressFn, no_progress
from modelkit.textsafe import quoted
from modelkit.vocab import GGUF_QUANT_TYPES

if TYPE_CHECKING:
    import numpy as np
    import torch

CHUNK = 1 << 20  # elements encoded per step (a multiple of every block size)
MAX_DIMS = 4  # GGML tensors have at most 4 dimensions
MAX_NAME = 127  # ComfyUI-GGUF's converter limit (llama.cpp's patched GGML_MAX_NAME - 1)
# user-facing qtype -> (default GGML type, gguf.LlamaFileType member): llama.cpp's
# file types (src/llama-quant.cpp), whose _S/_M mixes raise some tensors
QTYPES: dict[str, tuple[str, str]] = {
    "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    **{q: (q.upper().removesuffix("_M").removesuffix("_S"), f"MOSTLY_{q.upper()}")
       for q in GGUF_QUANT_TYPES}}
# GGML type name -> (elements per block, bytes per block), as gguf.GGML_QUANT_SIZES
GGML_SIZES = {n: (t.block_size, t.block_bytes) for n, t in GGML_TYPES.items()}
FLOAT_TYPES = frozenset(n for n, t in GGML_TYPES.items() if not t.module)
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
# chunk encoders of one write: both cores of the small machines modelkit
# targets (the k-quant scale search is the cost; see bench/bench_gguf_export.py)
ENCODE_THREADS = max(1, min(2, os.cpu_count() or 1))

Planner = Callable[[str, TensorInfo, str], "TensorPlan"]


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is stored.

    Args:
        key: the tensor name (in the source and in the GGUF file).
        ggml_type: a GGML type name (``Q4_K``, ``F16``...).
        shape: the stored shape, torch order (GGUF lists it reversed).
        orig_shape: the real shape when the tensor was flattened to fit the
            quant block (or GGML's 4 dimensions); recorded as
            ``comfy.gguf.orig_shape.<key>``.
        why: the planner's reason (``kept``, ``mix``, ``fallback``...).
    """

    key: str
    ggml_type: str
    shape: tuple[int, ...]
    orig_shape: tuple[int, ...] | None = None
    why: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        block, size = GGML_SIZES[self.ggml_type]
        return self.numel // block * size

    @property
    def quantized(self) -> bool:
        return self.ggml_type not in FLOAT_TYPES


@dataclass
class GGUFResult:
    """What :func:`write_gguf` wrote."""

    path: Path
    n_tensors: int
    n_quantized: int
    bytes_written: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def ggml_type_for(qtype: str) -> str:
    """The default GGML type of a user qtype (``q4_k_m`` -> ``Q4_K``)."""
    try:
        return QTYPES[qtype.lower()][0]
    except KeyError:
        raise ModelkitError(f"unknown GGUF type {qtype!r}; choose one of "
                            f"{', '.join(QTYPES)}") from None


def kept_float_type(st_dtype: str) -> str:
    """The GGML float type a small, 1-D or high-precision tensor keeps: F16
    and F32 stay as they are, anything else (BF16, F64, fp8) becomes F32
    (city96/ComfyUI-GGUF ``tools/convert.py``)."""
    return st_dtype if st_dtype in ("F16", "F32") else "F32"


def source_float_type(st_dtype: str) -> str:
    """The GGML float type of a tensor left unquantized by the quantizer: its
    own (F16, BF16, F32) as ``llama-quantize`` copies it, F32 for the others."""
    return st_dtype if st_dtype in ("F16", "BF16", "F32") else "F32"


def plain_plan(key: str, info: TensorInfo, ggml_type: str) -> TensorPlan:
    """The default planner: ``ggml_type`` wherever the last dimension fits the
    block (2-D and larger tensors), the source's float type elsewhere."""
    block = GGML_SIZES[ggml_type][0]
    shape = tuple(info.shape)
    if len(shape) >= 2 and shape[-1] % block == 0:
        return TensorPlan(key, ggml_type, shape)
    return TensorPlan(key, kept_float_type(info.dtype), shape)


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ModelkitError("GGUF export needs the 'gguf' package; install it with "
                            "'pip install gguf'") from None
    return gguf


def _check_plan(plan: TensorPlan, info: TensorInfo) -> None:
    if not info.is_float:
        raise ModelkitError(f"tensor {plan.key!r} is {info.dtype}; GGUF export "
                            "writes float tensors only")
    if len(plan.key.encode()) > MAX_NAME:
        raise ModelkitError(f"tensor name {plan.key!r} is longer than {MAX_NAME} bytes, "
                            "the most GGUF loaders accept")
    if not 1 <= len(plan.shape) <= MAX_DIMS:
        raise ModelkitError(f"tensor {plan.key!r} has {len(plan.shape)} dimensions; "
                            f"GGUF stores 1 to {MAX_DIMS}")
    if plan.numel != info.numel or plan.shape[-1] % GGML_SIZES[plan.ggml_type][0]:
        raise ModelkitError(f"tensor {plan.key!r}: plan {plan.ggml_type} "
                            f"{plan.shape} does not fit its shape {info.shape}")


@dataclass(frozen=True)
class TensorQuality:
    """The stored tensor against its float input: relative L2 error
    ``||stored - x|| / ||x||`` and SNR in dB."""

    key: str
    ggml_type: str
    relative_l2: float
    snr_db: float


@dataclass
class GGUFQuality:
    """Per-tensor error of a GGUF write (quantized tensors and lossy casts),
    measured while encoding, from the same chunks."""

    tensors: list[TensorQuality] = field(default_factory=list)
    err_sq: float = 0.0
    ref_sq: float = 0.0

    def add(self, key: str, ggml_type: str, err_sq: float, ref_sq: float) -> None:
        """Record one tensor's error sums."""
        from modelkit.numeric import relative_l2, snr_db

        self.tensors.append(TensorQuality(key, ggml_type, relative_l2(err_sq, ref_sq),
                                          snr_db(err_sq, ref_sq)))
        self.err_sq += err_sq
        self.ref_sq += ref_sq

    @property
    def relative_l2(self) -> float:
        """Over every measured tensor."""
        from modelkit.numeric import relative_l2

        return relative_l2(self.err_sq, self.ref_sq)

    @property
    def snr_db(self) -> float:
        from modelkit.numeric import snr_db

        return snr_db(self.err_sq, self.ref_sq)

    def worst(self, n: int = 5) -> list[TensorQuality]:
        """The ``n`` tensors with the largest relative error."""
        return sorted(self.tensors, key=lambda t: -t.relative_l2)[:n]

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (``--json``): totals, then every measured tensor."""
        return {"relative_l2": self.relative_l2, "snr_db": self.snr_db,
                "n_measured": len(self.tensors),
                "tensors": [{"key": t.key, "type": t.ggml_type, "relative_l2": t.relative_l2,
                             "snr_db": t.snr_db} for t in self.tensors]}


def _float_chunk(flat: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """``flat`` cast to the torch dtype of the GGML float type ``ggml_type``."""
    import torch

    dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[ggml_type]
    return flat.to(dtype)


def _encode_chunk(flat: torch.Tensor, ggml_type: str, measure: bool
                  ) -> tuple[np.ndarray, float, float]:
    """Bytes of a 1-D float chunk in ``ggml_type`` and, when ``measure``, the
    squared error of the stored values and the squared norm of the input
    (blocks run along the flattened row-major order, so any block-aligned
    slice quantizes alone)."""
    import numpy as np
    import torch

    from modelkit.io.ggml import dequantize_blocks, quantize_blocks

    if ggml_type in FLOAT_TYPES:
        cast = _float_chunk(flat, ggml_type)
        view = cast.view(torch.int16) if ggml_type == "BF16" else cast
        data = view.numpy().view(np.uint8)
        if not measure:
            return data, 0.0, 0.0
        x = flat.to(torch.float32)
        return data, _err_sq(cast.to(torch.float32), x), _sq(x)
    x = flat.to(torch.float32)
    blocks = _q8_encoder().encode(x) if ggml_type == "Q8_0" else quantize_blocks(x, ggml_type)
    data = blocks.numpy().reshape(-1)
    if not measure:
        return data, 0.0, 0.0
    return data, _err_sq(dequantize_blocks(blocks, ggml_type), x), _sq(x)


def _sq(x: torch.Tensor) -> float:
    import torch

    return float(torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)


def _err_sq(y: torch.Tensor, x: torch.Tensor) -> float:
    return _sq(y.sub_(x) if y.data_ptr() != x.data_ptr() else y - x)


class Q80Encoder:
    """GGML Q8_0 blocks of 1-D float chunks (multiples of 32 elements), as
    uint8 ``[n_blocks, 34]``: the fp16 scale ``d = max|x| / 127`` then 32
    int8 values ``round(x / d)``, rounded half away from zero.

    The result is byte-identical to ggml's reference and gguf-py's
    ``Q8_0.quantize_blocks`` (tested): the same float32 ``x * (1 / d)``, and
    their rounding ``fl + floor(2 (a - fl))`` (``a = |x / d|``, ``fl =
    floor(a)``), computed as the equal ``floor(2a) - floor(a)``. Every step
    writes into buffers reused across chunks (ten passes, no temporaries),
    in the calling thread.
    """

    def __init__(self, chunk: int = CHUNK) -> None:
        import torch

        self.x = torch.empty(chunk, dtype=torch.float32)
        self.a = torch.empty(chunk, dtype=torch.float32)
        self.t = torch.empty(chunk, dtype=torch.float32)
        self.out = torch.empty(chunk // 32, 34, dtype=torch.uint8)

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        """The blocks of ``flat`` (a view of a buffer reused by the next call)."""
        import torch

        n = flat.numel()
        x, a, t = self.x[:n], self.a[:n], self.t[:n]
        x.copy_(flat)
        torch.abs(x, out=a)
        d = a.view(-1, 32).amax(dim=1, keepdim=True).div_(127)
        inv = torch.where(d == 0, torch.zeros_like(d), d.reciprocal())
        a.view(-1, 32).mul_(inv)
        torch.mul(a, 2, out=t)
        t.floor_().sub_(a.floor_())
        torch.copysign(t, x, out=t)
        out = self.out[:n // 32]
        out[:, :2] = d.to(torch.float16).view(torch.uint8)
        out[:, 2:].view(torch.int8).copy_(t.view(-1, 32))
        return out


_ENCODERS = threading.local()


def _q8_encoder() -> Q80Encoder:
    """The calling thread's reusable encoder (freed with the thread)."""
    enc: Q80Encoder | None = getattr(_ENCODERS, "encoder", None)
    if enc is None:
        enc = _ENCODERS.encoder = Q80Encoder()
    return enc


def q8_0_blocks(flat: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks of ``flat`` (the same bytes as :class:`Q80Encoder`), in new
    memory: :func:`modelkit.io.ggml.legacy.quantize_q8_0`, which works in
    cache-sized chunks (about 3x faster on a whole 3072x3072 weight)."""
    from modelkit.io.ggml.legacy import quantize_q8_0

    return quantize_q8_0(flat)


def measured(plan: TensorPlan, st_dtype: str) -> bool:
    """Whether writing a tensor of safetensors dtype ``st_dtype`` under
    ``plan`` loses anything (quantized, or cast to a narrower float)."""
    if plan.quantized:
        return True
    return plan.ggml_type != st_dtype and plan.ggml_type != "F32"


def _default_name(source: Source, metadata: Mapping[str, str]) -> str:
    title = metadata.get("modelspec.title")
    if title:
        return title
    paths = source.input_paths
    return paths[0].stem if paths else "model"


@dataclass
class GGUFPayload:
    """A GGUF output: the tensors of ``source`` stored as ``plans`` say, with
    ``general.architecture`` ``arch`` and extra string key/values ``kv``."""

    source: Source
    plans: list[TensorPlan]
    qtype: str
    arch: str | None = None
    name: str | None = None
    kv: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quality: GGUFQuality = field(default_factory=GGUFQuality)  # filled by the write

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.plans)


def gguf_payload(source: Source, *, qtype: str = "q8_0", arch: str | None = None,
                 plan: Planner = plain_plan, name: str | None = None,
                 kv: Mapping[str, str] | None = None) -> GGUFPayload:
    """Plan every tensor of ``source`` for GGUF (``plan(key, info, ggml_type)``)
    and check that GGUF can hold it.

    Raises:
        ModelkitError: an unknown qtype or a tensor GGUF cannot hold.
    """
    qtype = qtype.lower()
    target_type = ggml_type_for(qtype)
    plans = [plan(k, i, target_type) for k, i in source.infos.items()]
    return planned_payload(source, plans, qtype=qtype, arch=arch, name=name, kv=kv)


def planned_payload(source: Source, plans: list[TensorPlan], *, qtype: str,
                    arch: str | None = None, name: str | None = None,
                    kv: Mapping[str, str] | None = None) -> GGUFPayload:
    """A payload of ``plans`` (one per tensor of ``source``, planned
    together: a mix counts tensors), checked that GGUF can hold each.

    Raises:
        ModelkitError: an unknown qtype or a tensor GGUF cannot hold.
    """
    qtype = qtype.lower()
    ggml_type_for(qtype)
    for p in plans:
        _check_plan(p, source.infos[p.key])
    return GGUFPayload(source, plans, qtype, arch, name, dict(kv or {}))


def _add_kv(writer: Any, gguf: Any, payload: GGUFPayload, metadata: Mapping[str, str]
            ) -> None:
    from modelkit import __version__

    source = payload.source
    writer.add_name(payload.name or _default_name(source, metadata))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, QTYPES[payload.qtype][1])))
    writer.add_string("modelkit.source", ", ".join(p.name for p in source.input_paths)
                      or source_label(source))
    writer.add_string("modelkit.qtype", payload.qtype)
    writer.add_string("modelkit.version", __version__)
    for k, v in payload.kv.items():
        writer.add_string(k, v)
    # this file's own keys win over those a GGUF input carried (its source, qtype)
    own = {"modelkit.source", "modelkit.qtype", "modelkit.version", *payload.kv}
    for k, v in metadata.items():
        key = k if k.startswith("modelkit.") else f"modelkit.source_metadata.{k}"
        if key not in own:
            writer.add_string(key, v)
    for p in payload.plans:
        if p.orig_shape is not None:
            # Python ints pack as INT32, the type ComfyUI-GGUF's loader checks for
            writer.add_array(ORIG_SHAPE_KEY + p.key, [int(d) for d in p.orig_shape])


def _open_writer(gguf: Any, temp: Path, arch: str | None, plans: list[TensorPlan]) -> Any:
    import numpy as np

    # GGUFWriter skips an empty string value, so arch=None writes no
    # general.architecture (ComfyUI-GGUF then guesses it from the keys)
    writer = gguf.GGUFWriter(temp, arch or "")
    for p in plans:
        writer.add_tensor_info(p.key, p.shape, np.dtype(np.float32), p.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType[p.ggml_type])
    return writer


def _patch(temp: Path, head_end: int, patches: Mapping[str, str]) -> None:
    """Replace equal-length placeholders in the first ``head_end`` bytes."""
    if not patches:
        return
    with open(temp, "r+b") as f:
        head = f.read(head_end)
        for old, new in patches.items():
            a, b = old.encode(), new.encode()
            if len(a) != len(b):
                raise ModelkitError("GGUF header patch must keep the length")
            pos = head.find(a)
            while pos >= 0:
                f.seek(pos)
                f.write(b)
                pos = head.find(a, pos + len(a))


@dataclass
class _Job:
    """One tensor being encoded by the pool: its output buffer and the
    futures of its chunks (each returns its error sums)."""

    plan: TensorPlan
    out: np.ndarray
    chunks: list[Future[tuple[float, float]]]
    lossy: bool


def _submit(pool: ThreadPoolExecutor, tensor: torch.Tensor, plan: TensorPlan,
            measure: bool) -> _Job:
    """Queue the chunks of ``tensor``; each worker writes its bytes into
    the job's buffer (a Q8_0 worker's blocks live in its own reused buffer)."""
    import numpy as np

    flat = tensor.detach().cpu().reshape(-1)
    out = np.empty(plan.nbytes, dtype=np.uint8)
    block, size = GGML_SIZES[plan.ggml_type]

    def encode(start: int) -> tuple[float, float]:
        chunk = flat[start:start + CHUNK]
        pos = start // block * size
        data, err, ref = _encode_chunk(chunk, plan.ggml_type, measure)
        if plan.quantized and not math.isfinite(ref):  # measured: ref is the input's norm
            raise ModelkitError(f"tensor {quoted(plan.key)} holds NaN or inf; GGML "
                                f"{plan.ggml_type} blocks cannot store it (repair or drop the "
                                "tensor first)")
        out[pos:pos + chunk.numel() // block * size] = data
        return err, ref

    futures = [pool.submit(encode, start) for start in range(0, flat.numel(), CHUNK)]
    return _Job(plan, out, futures, measure)


def _write_tensors(writer: Any, payload: GGUFPayload, advance: Callable[[int, str], None],
                   cancel: CancelFlag | None) -> None:
    """Encode and write every planned tensor in order, recording the error
    of each lossy one in ``payload.quality``. Chunks are encoded by
    :data:`ENCODE_THREADS` workers (torch releases the GIL; each op on one
    intra-op thread), and the next tensor is queued before the last one is
    written, so the workers never wait for the disk."""
    from modelkit.errors import check_cancel

    source, quality = payload.source, payload.quality
    quality.tensors.clear()
    quality.err_sq = quality.ref_sq = 0.0

    def finish(job: _Job) -> None:
        sums = [f.result() for f in job.chunks]
        writer.write_tensor_data(job.out)
        if job.lossy:
            quality.add(job.plan.key, job.plan.ggml_type, sum(e for e, _ in sums),
                        sum(r for _, r in sums))
        advance(job.plan.nbytes, job.plan.key)

    import torch

    # a new thread starts with torch's default intra-op threads: give the
    # workers the caller's (one under the runner), so that torch reduces in
    # the order the kernels rely on and does not spin beside busy processes
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="gguf-encode",
                              initializer=torch.set_num_threads, initargs=(threads,))
    try:
        pending: _Job | None = None
        for p in payload.plans:
            check_cancel(cancel)
            job = _submit(pool, source.get(p.key), p, measured(p, source.infos[p.key].dtype))
            if pending is not None:
                finish(pending)
            pending = job
        if pending is not None:
            finish(pending)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_gguf_payload(payload: GGUFPayload, out: Path, metadata: Mapping[str, str] | None,
                       inputs: list[Path], overwrite: bool,
                       advance: Callable[[int, str], None], cancel: CancelFlag | None,
                       finalize: Callable[[], Mapping[str, str]] | None) -> tuple[int, int]:
    """Write ``payload`` to ``out`` atomically; ``advance(nbytes, key)``
    reports progress. Returns (tensors, bytes written)."""
    from modelkit.errors import check_cancel

    gguf = _import_gguf()
    source = payload.source
    meta = source.metadata if metadata is None else metadata
    with atomic_path(out, [*inputs, *source.input_paths], overwrite) as temp:
        writer = _open_writer(gguf, temp, payload.arch, payload.plans)
        try:
            _add_kv(writer, gguf, payload, meta)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.flush()
            head_end = temp.stat().st_size
            _write_tensors(writer, payload, advance, cancel)
        finally:
            writer.close()
        _patch(temp, head_end, finalize() if finalize else {})
        check_cancel(cancel)
        size = temp.stat().st_size
    return len(payload.plans), size


def write_gguf(
    source: Source,
    out: str | os.PathLike[str],
    *,
    qtype: str = "q8_0",
    arch: str | None = None,
    plan: Planner = plain_plan,
    name: str | None = None,
    kv: Mapping[str, str] | None = None,
    progress: ProgressFn = no_progress,
) -> GGUFResult:
    """Write every tensor of ``source`` to a new GGUF file ``out`` (replacing
    it if it exists).

    Args:
        qtype: ``q8_0`` (default), ``f16`` or ``bf16``: the type of the
            tensors ``plan`` chooses to convert; the others stay float.
        arch: ``general.architecture`` (``sd1``, ``sdxl``...); None leaves it out.
        plan: ``plan(key, info, ggml_type)`` -> :class:`TensorPlan`.
        name: ``general.name`` (default: the source's title or file stem).
        kv: extra string key/values.

    Raises:
        OutputError: ``out`` is an input, a directory or in a missing folder.
        ModelkitError: a tensor GGUF cannot hold. Nothing is left at ``out``.
    """
    start = time.perf_counter()
    payload = gguf_payload(source, qtype=qtype, arch=arch, plan=plan, name=name, kv=kv)
    total, done = payload.nbytes, 0

    def advance(n: int, key: str) -> None:
        nonlocal done
        done += n
        progress(Progress("export-gguf", done, total, "bytes", key))

    n, size = write_gguf_payload(payload, Path(out), None, [], True, advance, None, None)
    return GGUFResult(Path(out), n, sum(p.quantized for p in payload.plans), size,
                      time.perf_counter() - start)


# GGML block types modelkit dequantizes (every type ComfyUI-GGUF and diffusers
# load but the IQ ones): the table of modelkit.io.ggml
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K",
              "Q4_K", "Q3_K", "Q2_K")


def _block_bytes(ggml_type: str) -> int:
    from modelkit.io.ggml import GGML_TYPES

    return GGML_TYPES[ggml_type].block_bytes


def _tensor_array(f: Any, header: Any, t: Any) -> np.ndarray:
    """The stored bytes of GGUF tensor ``t`` as a numpy array of its element
    type (uint8 ``[n_blocks, block_bytes]`` for block types), read from the
    open file ``f``."""
    import numpy as np

    from modelkit.errors import BadFileError
    from modelkit.textsafe import quoted, shown

    f.seek(header.data_start + t.offset)
    raw = f.read(t.nbytes)
    if len(raw) != t.nbytes:
        raise BadFileError(f"{shown(header.path, 300)}: truncated inside tensor "
                           f"{quoted(t.name)} (the file changed since it was opened?)")
    order = "<" if header.byte_order == "little" else ">"
    if t.ggml_type not in FLOAT_TYPES:
        return np.frombuffer(raw, dtype=np.uint8).reshape(-1, _block_bytes(t.ggml_type))
    code = {"F32": "f4", "F16": "f2", "BF16": "i2"}[t.ggml_type]
    return np.frombuffer(raw, dtype=order + code).astype("=" + code)


def dequantize_gguf_blocks(blocks: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """Float32 values of uint8 GGML blocks ``[n_blocks, block_bytes]``:
    modelkit's own kernels (:func:`modelkit.io.ggml.dequantize_blocks`) when
    this build has the type's module, else gguf-py's ``gguf.quants.dequantize``
    (the same float32 operations as ggml's ``dequantize_row_<type>``; tests
    check the two agree bit for bit). Blocks are done :data:`CHUNK` values at
    a time into one output, so the temporaries stay small."""
    from importlib.util import find_spec

    import torch

    from modelkit.io.ggml import GGML_TYPES, dequantize_blocks

    kind = GGML_TYPES[ggml_type]
    if kind.module and find_spec(f"modelkit.io.ggml.{kind.module}") is not None:
        def kernel(data: torch.Tensor) -> torch.Tensor:
            return dequantize_blocks(data, ggml_type)
    else:
        gguf = _import_gguf()
        qtype = gguf.GGMLQuantizationType[ggml_type]

        def kernel(data: torch.Tensor) -> torch.Tensor:
            arr = gguf.quants.dequantize(data.numpy(), qtype)
            return torch.from_numpy(arr.reshape(-1).astype("float32", copy=False))

    n_blocks = blocks.shape[0]
    out = torch.empty(n_blocks * kind.block_size, dtype=torch.float32)
    step = max(1, CHUNK // kind.block_size)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        out[start * kind.block_size:stop * kind.block_size] = kernel(blocks[start:stop])
    return out


def read_gguf_infos(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo],
                                                           dict[str, str]]:
    """A GGUF file's tensors as :func:`open_gguf` presents them (original
    shapes, dequantized dtypes) and its metadata, from the header alone.

    Raises:
        BadFileError: not a GGUF file modelkit can read.
    """
    from modelkit.io.gguf_header import read_gguf_header

    return _gguf_infos(read_gguf_header(Path(path)))


def _gguf_infos(header: Any) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    from modelkit.errors import BadFileError
    from modelkit.io.source import tensor_info
    from modelkit.textsafe import quoted, shown

    p = header.path
    infos = {}
    for name, t in header.tensors.items():
        kind = t.ggml_type
        if kind not in READ_TYPES:
            raise BadFileError(f"{shown(p, 300)}: tensor {quoted(name)} is {kind}; modelkit "
                               f"reads GGUF tensors of type {', '.join(READ_TYPES)}")
        if kind not in FLOAT_TYPES and header.byte_order != "little":
            raise BadFileError(f"{shown(p, 300)}: a big-endian {kind} GGUF file; modelkit "
                               "reads quantized GGUF from little-endian files only")
        shape = header.orig_shape(name) or t.shape
        infos[name] = tensor_info(name, _read_dtype(kind), tuple(int(d) for d in shape))
    prefix = "modelkit.source_metadata."
    meta = {(k[len(prefix):] if k.startswith(prefix) else k): v
            for k, v in header.kv.items()
            if k.startswith(("modelkit.", "general.")) and isinstance(v, str)}
    return infos, meta


def _read_dtype(ggml_type: str) -> str:
    """The dtype a GGUF tensor is presented in: float types as stored; Q8_0
    as F16 (as modelkit has always read its own Q8_0 exports); every other
    block type as F32, the exact result of ggml's float32 dequantization."""
    if ggml_type in FLOAT_TYPES:
        return ggml_type
    return "F16" if ggml_type == "Q8_0" else "F32"


def open_gguf(path: str | os.PathLike[str], device: str = "cpu") -> Source:
    """Open a GGUF file as a source: every tensor dequantized (see
    :func:`read_gguf_infos` for the dtypes) in its original shape
    (``comfy.gguf.orig_shape`` records are applied), metadata from the
    ``modelkit.*`` and ``general.*`` string keys.

    The header is read and checked by modelkit's own bounded reader
    (:func:`modelkit.io.gguf_header.read_gguf_header`) before anything is
    allocated, and tensor bytes are read at the offsets it checked: a
    hostile header is refused in one line, never handed to gguf-py.

    Raises:
        BadFileError: not a GGUF file modelkit can read.
    """
    from modelkit.io.dtypes import to_torch
    from modelkit.io.files import open_input_file
    from modelkit.io.gguf_header import read_gguf_header
    from modelkit.io.source import DerivedSource

    p = Path(path)
    header = read_gguf_header(p)
    infos, meta = _gguf_infos(header)

    def produce(key: str) -> torch.Tensor:
        import torch

        t = header.tensors[key]
        with open_input_file(p) as f:
            raw = _tensor_array(f, header, t)
        if t.ggml_type not in FLOAT_TYPES:
            values = dequantize_gguf_blocks(torch.from_numpy(raw.copy()), t.ggml_type)
            out = values.to(to_torch(infos[key].dtype))
        elif t.ggml_type == "BF16":
            out = torch.from_numpy(raw.reshape(-1).copy()).view(torch.bfloat16)
        else:
            out = torch.from_numpy(raw.reshape(-1).copy())
        return out.reshape(infos[key].shape).to(device)

    return DerivedSource(str(p), infos, meta, produce, (p,))
