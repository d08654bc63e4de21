"""Quantized-model cache: what a quantization changed, stored (safetensors, never pickle) so that
applying it to a fresh copy of the FP model restores bit-identical weights.

Files in <root>/quantized/<key[:2]>/: <key>.safetensors; <key>.sha256 (its checksum, sha256sum
format); <key>.safetensors.lock (kept: deleting a lock file someone waits on breaks exclusion).
Tensors: weight/<param>/{codes | codes4, scale, zero, group_index} (codes4: codes < 16 packed two
per byte along the columns, even column in the low nibble); raw/<param>: other parameters the method
changed; state/<name>: what the method's state() returned (AWQ's explicit input scales), handed
back to its restore(). Metadata "vlmqb_cache": JSON {format, key, meta}.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
from filelock import FileLock
from safetensors import SafetensorError
from torch import nn

# One dequantization formula for quantizers and cache alike: that is what makes restore bit-identical.
from quantizers.primitives import QuantizedTensor, dequantize, plain_group_index  # noqa: F401  (re-exported)

FORMAT_VERSION = 2   # 2: method state under state/ (was buffer/), any method's
META_FIELD = "vlmqb_cache"
# Fixed dtypes keep dequantize() the very float32 arithmetic the quantizers use.
PART_DTYPES = {"codes": torch.uint8, "scale": torch.float32, "zero": torch.float32, "group_index": torch.int64}


@dataclass
class QuantEntry:
    weights: dict[str, QuantizedTensor] = field(default_factory=dict)  # by "<linear>.weight"
    raw: dict[str, torch.Tensor] = field(default_factory=dict)          # by parameter name
    state: dict[str, torch.Tensor] = field(default_factory=dict)        # the method's own, by name
    meta: dict = field(default_factory=dict)                            # JSON-serializable record


def cache_key(*parts) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces), so equal parts give equal keys anywhere.
    Parts must be JSON values: anything else raises TypeError instead of being str()'d, whose
    output (object addresses, reprs) would not be stable."""
    text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """blake2b over a tensor's shape, dtype and raw bytes (copied to the host first)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.blake2b(json.dumps([list(tensor.shape), str(tensor.dtype)]).encode(), digest_size=16)
    digest.update(data.numpy())
    return digest.hexdigest()


def parameter_digests(model: nn.Module) -> dict[str, str]:
    """{parameter name: tensor_digest}; hashed together, the identity of a model's weights.
    Cost: one pass over every weight byte on one CPU core, about 1 s per GB."""
    return {name: tensor_digest(param) for name, param in model.named_parameters()}


@torch.no_grad()
def change_markers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: two checksums of its raw bits}, computed where the parameter lives: for
    telling which parameters a quantization changed (the coverage check), not as an identity.
    Both sums are over the bit patterns as integers, the second weighted by position, so a
    changed element (or two swapped ones) changes them. On a GPU this costs milliseconds where
    hashing every byte on the host cost about a minute for a 7B model, twice per config."""
    names: dict[torch.device, list[str]] = {}
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        bits = flat.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]).long()
        weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        names.setdefault(bits.device, []).append(name)
        sums.setdefault(bits.device, []).append(torch.stack([bits.sum(), (bits * weights).sum()]))
    # One read-back per device, not two synchronizations per parameter (about 1,200 for a 7B model)
    markers = {}
    for device, device_sums in sums.items():
        markers.update(zip(names[device], map(tuple, torch.stack(device_sums).tolist())))
    return {name: markers[name] for name, _ in model.named_parameters()}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name and digest, in named_parameters() order."""
    return cache_key(list(parameter_digests(model).items()))


def _check_weight(name: str, w: QuantizedTensor) -> None:
    for part, dtype in PART_DTYPES.items():
        if getattr(w, part).dtype != dtype:
            raise ValueError(f"{name}: {part} must be {dtype}, got {getattr(w, part).dtype}")
    rows, n_groups = w.scale.shape if w.scale.dim() == 2 else (-1, -1)
    cols = w.group_index.numel()
    if (w.codes.dim() != 2 or w.scale.shape != w.zero.shape or w.codes.shape[0] != rows
            or w.group_index.dim() != 1 or w.codes.shape[1] != (-(-cols // 2) if w.packed else cols)):
        packed = " (packed)" if w.packed else ""
        raise ValueError(f"{name}: inconsistent shapes: codes {tuple(w.codes.shape)}{packed}, "
                         f"scale {tuple(w.scale.shape)}, zero {tuple(w.zero.shape)}, "
                         f"group_index {tuple(w.group_index.shape)}")
    if w.group_index.numel() and not 0 <= int(w.group_index.min()) <= int(w.group_index.max()) < n_groups:
        raise ValueError(f"{name}: group_index outside [0, {n_groups})")


def _encode(entry: QuantEntry) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, w in entry.weights.items():
        _check_weight(name, w)
        w = w.packed_if_it_fits()   # quantize()'s entries come packed already (QuantizedTensor.to_host)
        tensors[f"weight/{name}/{'codes4' if w.packed else 'codes'}"] = w.codes
        tensors.update({f"weight/{name}/{part}": getattr(w, part) for part in ("scale", "zero", "group_index")})
    tensors.update({f"raw/{name}": t for name, t in entry.raw.items()})
    tensors.update({f"state/{name}": t for name, t in entry.state.items()})
    # safetensors refuses views and tensors sharing storage (tied weights): a tensor that is a
    # whole host buffer of its own (quantize()'s host copies: no second copy of a 7B model's
    # codes on the run's thread) is written as it is, anything else is copied.
    seen: set[int] = set()
    return {k: _sole_host_buffer(t.detach(), seen) for k, t in tensors.items()}


def _sole_host_buffer(tensor: torch.Tensor, seen: set[int]) -> torch.Tensor:
    storage = tensor.untyped_storage()
    whole = (tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.storage_offset() == 0
             and storage.nbytes() == tensor.numel() * tensor.element_size() and storage.data_ptr() not in seen)
    if not whole:
        tensor = tensor.cpu().clone(memory_format=torch.contiguous_format)
    seen.add(tensor.untyped_storage().data_ptr())
    return tensor


def _decode(tensors: dict[str, torch.Tensor], meta: dict) -> QuantEntry:
    entry, parts = QuantEntry(meta=meta), {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "weight":
            name, _, part = rest.rpartition("/")
            parts.setdefault(name, {})[part] = tensor
        elif kind in ("raw", "state"):
            (entry.raw if kind == "raw" else entry.state)[rest] = tensor
        else:
            raise ValueError(f"unknown tensor {key!r}")
    for name, p in parts.items():
        # Packed codes stay packed: apply_entry unpacks them on the model's device.
        packed = "codes4" in p
        entry.weights[name] = QuantizedTensor(p["codes4" if packed else "codes"], p["scale"], p["zero"],
                                              p["group_index"], packed=packed)
        _check_weight(name, entry.weights[name])
    return entry


def _write_temp(target: Path, write: Callable[[str], None]) -> Path:
    """A fully written, fsynced temp file beside target (same file system: os.replace is atomic),
    its bytes written by write(path)."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.close(fd)
        write(name)
        with open(name, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(name, 0o644)  # mkstemp makes 0600; a shared cache must be readable by others
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)   # hashlib releases the GIL on large buffers
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make the renames themselves durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class QuantCache:
    """write_behind: a built entry is copied to the host at once and written to disk by one
    background thread, while the caller goes on (a 7B language model's entry is about 3.7 GB:
    12-24 s of the H100 perf grid's configs went to writing it). The entry's lock is held from the
    build until the write is done, so other processes still wait and load; this process's own
    reads of the entry wait for its write. close() waits for every write."""

    def __init__(self, root: Path, write_behind: bool = False):
        self.root = Path(root)
        self._locks: dict[Path, FileLock] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="quant-cache-write") if write_behind else None
        self._pending: dict[str, Future] = {}

    def path(self, key: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", key):  # keys become file names: only cache_key() output
            raise ValueError(f"not a cache key (64 lowercase hex digits): {key!r}")
        return self.root / "quantized" / key[:2] / f"{key}.safetensors"

    def sidecar(self, key: str) -> Path:
        return self.path(key).with_suffix(".sha256")

    def _lock(self, key: str) -> FileLock:
        """One FileLock object per entry, re-entered by load/save inside get_or_build (a second
        object on the same file would deadlock: flock excludes other descriptors of this process)."""
        path = self.path(key)
        if path not in self._locks:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Not per thread: a write-behind build's lock is released by the writing thread.
            self._locks[path] = FileLock(f"{path}.lock", thread_local=False)  # waits as long as a build takes
        return self._locks[path]

    def _finish(self, key: str) -> None:
        """Wait for this process's own write of key, if one is under way. A failed write loses
        only the entry (the next run builds it again): warned about, never raised."""
        future = self._pending.pop(key, None)
        if future is not None:
            try:
                future.result()
            except Exception as error:  # noqa: BLE001  (any failure to write costs only the entry)
                warnings.warn(f"quantized-model cache: could not write {self.path(key)}: {error}", stacklevel=3)

    def close(self) -> None:
        """Wait for every write behind. (The executor's own exit hook would wait too; the
        session calls this at its end, where stop signals are held, so a second Ctrl-C cannot
        cut the wait short.)"""
        for key in list(self._pending):
            self._finish(key)

    def load(self, key: str) -> QuantEntry | None:
        """The entry, or None on a miss. An entry that fails verification is warned about, deleted
        and reported as a miss: it is never used, and the next get_or_build rebuilds it."""
        path = self.path(key)
        self._finish(key)
        with self._lock(key):  # a reader never sees a save half-way between its two renames
            if not path.exists():
                return None
            try:
                return self._read(key, path)
            except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
                warnings.warn(f"quantized-model cache: discarding {path}: {error}", stacklevel=2)
                for file in (path, self.sidecar(key)):
                    file.unlink(missing_ok=True)
                return None

    def _read(self, key: str, path: Path) -> QuantEntry:
        sidecar = self.sidecar(key)  # a missing one raises FileNotFoundError: rejected like a mismatch
        data = path.read_bytes()  # hashed and parsed from one read, so both see the same bytes
        if hashlib.sha256(data).hexdigest() != sidecar.read_text().partition(" ")[0]:
            raise ValueError("checksum mismatch (corrupt or partly written file)")
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # u64 length, JSON header
        record = json.loads(header["__metadata__"][META_FIELD])
        if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION or record.get("key") != key:
            raise ValueError(f"metadata is not format {FORMAT_VERSION} for this key")
        return _decode(safetensors.torch.load(data), record["meta"])

    def save(self, key: str, entry: QuantEntry) -> None:
        self._write(key, *self._host_copy(key, entry))

    @staticmethod
    def _host_copy(key: str, entry: QuantEntry) -> tuple[dict[str, torch.Tensor], str]:
        """What a write needs, on the host and checked: the tensors and the metadata record."""
        return _encode(entry), json.dumps({"format": FORMAT_VERSION, "key": key, "meta": entry.meta})

    def _write(self, key: str, tensors: dict[str, torch.Tensor], record: str) -> None:
        """Both files go to fsynced temp files first; then the data replaces, and the sidecar last.
        A crash at any point leaves the old entry, or data whose sidecar is missing or stale, which
        load() rejects: never an entry that verifies but is incomplete."""
        path, sidecar = self.path(key), self.sidecar(key)
        with self._lock(key):
            # Straight to the file: safetensors' save_file serializes without holding the GIL,
            # where save() (bytes in memory) held it about 1.2 s per 0.46 GB and stalled the run's
            # own thread while an entry was written behind it (benchmarks/perf/cache_write.py
            # --main-thread). Same bytes either way.
            temps = [_write_temp(path, lambda name: safetensors.torch.save_file(tensors, name, {META_FIELD: record}))]
            try:
                line = f"{_file_sha256(temps[0])}  {path.name}\n".encode()
                temps.append(_write_temp(sidecar, lambda name: Path(name).write_bytes(line)))
                os.replace(temps[0], path)
                os.replace(temps[1], sidecar)
                _fsync_dir(path.parent)
            finally:
                for temp in temps:  # already renamed away on success
                    temp.unlink(missing_ok=True)

    def get_or_build(self, key: str, build: Callable[[], QuantEntry]) -> tuple[QuantEntry, bool]:
        """(entry, built). Under the entry's lock: load, or build and save. A process asking for the
        same key meanwhile waits on the lock and then loads, so each entry is built once."""
        self._finish(key)
        lock = self._lock(key)
        lock.acquire()
        handed_over = False
        try:
            entry = self.load(key)
            if entry is not None:
                return entry, False
            entry = build()
            if self._writer is None:
                self.save(key, entry)
            else:   # the lock goes with the write: released when the entry is on disk
                self._pending[key] = self._writer.submit(self._write_and_release, key, lock,
                                                         *self._host_copy(key, entry))
                handed_over = True
        finally:
            if not handed_over:
                lock.release()
        # Hand back meta as a later load returns it (JSON turns tuples into lists), like the waiters.
        return replace(entry, meta=json.loads(json.dumps(entry.meta))), True

    def _write_and_release(self, key: str, lock: FileLock, tensors: dict[str, torch.Tensor], record: str) -> None:
        try:
            self._write(key, tensors, record)
        finally:
            lock.release()


def _resolve(params: dict[str, nn.Parameter], name: str, shape, dtype=None) -> nn.Parameter:
    if name not in params:
        raise KeyError(f"cache entry names {name!r}, which is not a parameter of the model")
    param = params[name]
    if tuple(param.shape) != tuple(shape):
        raise ValueError(f"{name}: entry shape {tuple(shape)} != model shape {tuple(param.shape)}")
    if dtype is not None and param.dtype != dtype:  # a silent cast would break bit-identity
        raise ValueError(f"{name}: entry dtype {dtype} != model dtype {param.dtype}")
    return param


@torch.no_grad()
def apply_entry(model: nn.Module, entry: QuantEntry) -> None:
    """Write dequantized weights and raw parameters into model by name. Every name and shape is
    checked before anything is written, so a mismatched entry leaves the model untouched."""
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = {name: _resolve(params, name, w.shape) for name, w in entry.weights.items()}
    raws = {name: _resolve(params, name, t.shape, t.dtype) for name, t in entry.raw.items()}
    for name, param in weights.items():
        # Unpacked and dequantized where the parameter lives, not on the host (part of the 17-34 s
        # that reading a 7B language model's entry took on an H100 machine at 7c729b1); float32
        # sub and mul round the same on any device, so the weight is bit-identical either way.
        w = entry.weights[name].to_device(param.device).unpacked()
        param.copy_(dequantize(w.codes, w.scale, w.zero, w.group_index, param.dtype))
    for name, param in raws.items():
        param.copy_(entry.raw[name])
