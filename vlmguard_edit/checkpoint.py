"""Reading checkpoints without loading them, and writing the guarded copy atomically.

A safetensors file is an 8-byte little-endian header length N, a JSON header
``{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {...}}``, then the data.
Editing keeps every tensor's dtype and shape, so the guarded shard is a byte copy of the
source shard (made by the OS, no Python per byte) with the edited byte ranges overwritten
in place. The header, metadata and every untouched tensor stay byte-identical, and peak
memory grows with the largest edited tensor, not with the shard or the model.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

import blake3

from .errors import CheckpointError, InputError
from .writes import io_errors, temp_path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Weight files in formats we do not edit. Copying them would ship an unguarded copy of the
# weights beside the guarded one, so they are left out of the output (and listed as dropped).
_OTHER_WEIGHT_PATTERNS = (
    r".*\.bin",
    r".*\.pt",
    r".*\.pth",
    r".*\.ckpt",
    r".*\.pkl",
    r".*\.msgpack",
    r".*\.h5",
    r".*\.ot",
    r".*\.gguf",
    r"pytorch_model\.bin\.index\.json",
    r"consolidated.*",  # Mistral's native-format copy of the same weights
)
# Files never copied: VCS / download bookkeeping, and the source's model card (we write ours).
_SKIPPED_PATTERNS = (r"\.git(/.*)?", r"\.cache(/.*)?", r"\.gitattributes", r"README\.md")
_HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5", "*.ot"]
_HUB_IGNORE += ["*.gguf", "consolidated*", "pytorch_model.bin.index.json"]

# safetensors dtype -> (torch dtype name, item size). torch is imported only where tensor
# data is touched: headers, plans and the byte copies need no torch (convert starts copying
# while torch is still being imported).
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and what to record about where they came from."""

    path: Path
    id: str  # the Hub id or the folder as the user gave it
    revision: str | None  # Hub commit sha, None for a local folder
    from_hub: bool


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class ShardHeader:
    path: Path
    header_bytes: int  # 8 + N
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


@dataclass
class Checkpoint:
    """A checkpoint folder, known from its config and safetensors headers alone."""

    path: Path
    config: dict[str, Any]
    shards: dict[str, ShardHeader]  # file name -> header
    key_to_file: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def info(self, key: str) -> TensorInfo:
        return self.shards[self.key_to_file[key]].tensors[key]

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard (only its bytes)."""
        return read_tensor(self.path / self.key_to_file[key], self.info(key))


def is_hub_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*", text) is not None


def resolve_model(
    id_or_path: str | Path,
    revision: str | None = None,
    allow_pickle: bool = False,
    config_only: bool = False,
) -> ModelSource:
    """A local folder as it is, or a Hub id downloaded (safetensors only unless allow_pickle).

    ``config_only`` downloads just the JSON files of a Hub repo (for checks and dry runs).
    """
    text = str(id_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(
                f"{text} is a file; pass the model's folder (the one with config.json)"
            )
        return ModelSource(path.resolve(), text, None, False)
    if not is_hub_id(text):
        raise InputError(
            f"{text} does not exist (not a local folder, and not a Hub id like org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .hub_client import bound_hub_calls

    bound_hub_calls()
    try:
        folder = snapshot_download(
            text,
            revision=revision,
            allow_patterns=["*.json"] if config_only else None,
            ignore_patterns=None if allow_pickle else _HUB_IGNORE,
        )
    except GatedRepoError as exc:
        raise InputError(f"{text} is gated on the Hub: accept its licence and log in") from exc
    except RepositoryNotFoundError as exc:
        raise InputError(f"{text} is neither a local folder nor a Hub repo you can read") from exc
    except RevisionNotFoundError as exc:
        raise InputError(f"{text} has no revision {revision!r} on the Hub") from exc
    except LocalEntryNotFoundError as exc:
        raise InputError(
            f"{text} is not a local folder and could not be downloaded (offline, or not in the "
            "Hub cache); pass a local folder or check HF_HUB_OFFLINE and the network"
        ) from exc
    except OSError as exc:  # network errors from requests/httpx are OSErrors
        raise InputError(f"could not download {text} from the Hub: {exc}") from exc
    folder_path = Path(folder)
    return ModelSource(folder_path, text, folder_path.name, True)


def parse_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header; refuse truncated or corrupt files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
            length = int.from_bytes(head, "little")
            if length > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file (header says {length} bytes, "
                    f"file has {size}); download it again"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} has a corrupt safetensors header; download it again"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header; download it again")
    metadata = header.pop("__metadata__", None)
    base = 8 + length
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = (
                entry["dtype"],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt header entry for {name}") from exc
        itemsize = _DTYPES.get(dtype, (None, 0))[1]
        if itemsize and math.prod(shape) * itemsize != end - start:
            raise CheckpointError(
                f"{path}: {name} has {end - start} bytes for shape {shape} {dtype}"
            )
        tensors[name] = TensorInfo(dtype, shape, base + start, base + end)
        data_end = max(data_end, end)
    if base + data_end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: the header describes {base + data_end} bytes, the "
            f"file has {size}; download it again"
        )
    return ShardHeader(path, base, tensors, metadata)


def hub_keys(source: ModelSource) -> tuple[dict[str, Any], list[str]]:
    """Config and tensor names of a Hub model fetched with ``config_only``: from its
    safetensors index when it has one, else from the single file's header, read with HTTP
    range requests (huggingface_hub's get_safetensors_metadata): no weights downloaded."""
    config = _read_config(source.path)
    if (source.path / INDEX_NAME).is_file():
        return config, sorted(_read_weight_map(source.path))
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError

    from .hub_client import bound_hub_calls

    bound_hub_calls()

    try:
        metadata = get_safetensors_metadata(source.id, revision=source.revision)
    except NotASafetensorsRepoError as exc:
        raise CheckpointError(f"{source.id} has no {SINGLE_NAME} or {INDEX_NAME}") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise InputError(f"could not read the safetensors header of {source.id}: {exc}") from exc
    return config, sorted(metadata.weight_map)


def _read_config(path: Path) -> dict[str, Any]:
    """A checkpoint folder's config.json; quantized models refused."""
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} is not a model checkpoint: it has no {CONFIG_NAME}")
    try:
        config = json.loads((path / CONFIG_NAME).read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from exc
    refuse_quantized(config, path)
    return config


def _read_weight_map(path: Path) -> dict[str, str]:
    try:
        return json.loads((path / INDEX_NAME).read_text("utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / INDEX_NAME} is corrupt (no weight_map): {exc}") from exc


def open_checkpoint(path: Path) -> Checkpoint:
    """Read config and safetensors headers of a checkpoint folder; no tensor data is read."""
    config = _read_config(path)
    if (path / INDEX_NAME).is_file():
        weight_map = _read_weight_map(path)
    elif (path / SINGLE_NAME).is_file():
        weight_map = None
    else:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if pickles:
            raise CheckpointError(
                f"{path} has only pickle weights ({', '.join(pickles[:3])}); vlmguard-edit edits "
                "safetensors checkpoints. Convert it first (load it with transformers and "
                "save_pretrained(..., safe_serialization=True)) if you trust its source"
            )
        raise CheckpointError(f"{path} has no {SINGLE_NAME} or {INDEX_NAME}: not a checkpoint")
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
    shards: dict[str, ShardHeader] = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(
                f"shard {name} is named in {INDEX_NAME} but missing from {path}; download it again"
            )
        shards[name] = parse_header(path / name)
    key_to_file: dict[str, str] = {}
    if weight_map:
        for key, name in weight_map.items():
            if key not in shards[name].tensors:
                raise CheckpointError(f"{INDEX_NAME} puts {key} in {name}, but that shard lacks it")
            key_to_file[key] = name
    else:
        key_to_file = dict.fromkeys(shards[SINGLE_NAME].tensors, SINGLE_NAME)
    return Checkpoint(path, config, shards, key_to_file)


def refuse_quantized(config: dict[str, Any], where: Path) -> None:
    for scope in (config, config.get("text_config") or {}):
        quant = scope.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
            raise CheckpointError(
                f"{where} is quantized ({method}); folding a float edit into quantized weights "
                "is not exact. Convert the unquantized model, then quantize the guarded output"
            )


def default_device(device: str | None = None) -> str:
    """``device`` as given, else cuda when there is one, else cpu."""
    return device or ("cuda" if import_torch().cuda.is_available() else "cpu")


def import_torch():
    """numpy, then torch. torch imports numpy lazily from C++ on the first ``.numpy()`` and
    clears any error raised there, a Ctrl-C included (measured: the run then went on and
    wrote its output). Imported from Python first, an interrupt propagates as it should."""
    import numpy  # noqa: F401
    import torch

    return torch


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes straight into a tensor of its dtype and shape (one buffer)."""
    if info.dtype not in _DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {info.dtype} in {path}")
    torch = import_torch()
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(path, "rb") as handle:
        handle.seek(info.start)
        got = handle.readinto(memoryview(raw.numpy()))
    if got != info.nbytes:
        raise CheckpointError(f"{path} is truncated: short read at byte {info.start}")
    return raw.view(getattr(torch, _DTYPES[info.dtype][0])).reshape(info.shape)


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor, without a copy when it is contiguous (for hashing, writing)."""
    torch = import_torch()
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def save_with_provenance(
    path: Path, tensors: dict[str, torch.Tensor], fmt: dict[str, str], meta: dict[str, Any]
) -> None:
    """A direction or edit file: ``fmt`` (the "vlmguard.format" line...) and each ``meta``
    value JSON-encoded under "vlmguard.<key>"."""
    metadata = {"format": "pt", **fmt}
    for key, value in sorted(meta.items()):
        metadata[f"vlmguard.{key}"] = json.dumps(value, sort_keys=True)
    write_safetensors(path, tensors, metadata)


def read_provenance(path: Path, what: str, error: type[Exception]) -> tuple[ShardHeader, dict]:
    """The header and raw metadata of a direction or edit file, or one line: missing,
    unreadable. Read with the project's own reader, so an interrupt stays an interrupt."""
    if not Path(path).is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        header = parse_header(Path(path))
    except CheckpointError as exc:
        raise error(f"{path} is not a readable {what}: {exc}") from exc
    return header, header.metadata or {}


def decode_provenance(metadata: dict[str, str], skip: tuple[str, ...]) -> dict[str, Any]:
    """The "vlmguard.<key>" values, JSON-decoded, except the ``skip`` keys."""
    return {
        k.removeprefix("vlmguard."): json.loads(v)
        for k, v in metadata.items()
        if k.startswith("vlmguard.") and k not in skip
    }


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors file byte-deterministically (sorted header; safetensors' own
    writer orders metadata through a hash map, so equal inputs can give different bytes)."""
    import torch

    names = {getattr(torch, name): key for key, (name, _) in _DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        blob = tensor_buffer(tensors[name])
        header[name] = {
            "dtype": names[tensors[name].dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + blob.nbytes],
        }
        blobs.append(blob)
        offset += blob.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
    # Written beside the target and renamed, so an interrupted write leaves no partial file.
    partial = temp_path(path)
    try:
        with io_errors(path), open(partial, "wb") as handle:
            handle.write(len(raw).to_bytes(8, "little"))
            handle.write(raw)
            for blob in blobs:
                handle.write(blob)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# The checkpoint's content hash (vlmguard.json, verify). BLAKE3: cryptographic like sha256 and
# about 4x faster per core (measured 3.75 vs 0.95 GB/s on the CI machine), so hashing every
# written file costs little next to copying it.
HASH = "blake3"


def digest_bytes(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


def digest_file(path: Path) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            hasher.update(block)
    return hasher.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """What vlmguard.json records of a written file."""
    return {"size": path.stat().st_size, HASH: digest_file(path)}


def classify_files(source: Path, weight_files: set[str]) -> tuple[list[str], list[str]]:
    """Split the source folder's other files into (copied, dropped) relative paths."""
    copied, dropped = [], []
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source).as_posix()
        if rel in weight_files or any(re.fullmatch(p, rel) for p in _SKIPPED_PATTERNS):
            continue
        if any(re.fullmatch(p, file.name) for p in _OTHER_WEIGHT_PATTERNS):
            dropped.append(rel)
        else:
            copied.append(rel)
    return copied, dropped


def copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with io_errors(target):
        shutil.copyfile(source, target)  # follows Hub-cache symlinks; sendfile on Linux


def allocate_like(source: Path, target: Path) -> None:
    """Create ``target`` with ``source``'s size, for copy_except and ShardPatcher to fill."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with io_errors(target), open(target, "wb") as handle:
        handle.truncate(source.stat().st_size)


def copy_except(source: Path, target: Path, holes: list[tuple[int, int]]) -> None:
    """Copy every byte of ``source`` into the allocated ``target`` except the [start, end)
    holes, which another writer fills at the same time (disjoint ranges of the same file).
    In the kernel where it can be (copy_file_range: no Python in the data path, reflinks on
    filesystems that have them), else in 16 MiB blocks. Releases the GIL while it copies."""
    size = source.stat().st_size
    ranges, position = [], 0
    for start, end in sorted(holes):
        if start > position:
            ranges.append((position, start))
        position = max(position, end)
    if position < size:
        ranges.append((position, size))
    with io_errors(target), open(source, "rb") as src, open(target, "r+b") as dst:
        for start, end in ranges:
            _copy_range(src.fileno(), dst.fileno(), start, end)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    offset = start
    kernel = hasattr(os, "copy_file_range")
    while offset < end:
        if kernel:
            try:
                # In 64 MiB calls: a call holds the target's inode lock, and the folding
                # thread writes its tensors into the same file meanwhile.
                done = os.copy_file_range(src, dst, min(1 << 26, end - offset), offset, offset)
            except OSError as exc:  # e.g. EXDEV on old kernels, ENOSYS: copy in user space
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                kernel = False
                continue
        else:
            block = os.pread(src, min(1 << 24, end - offset), offset)
            done = os.pwrite(dst, block, offset) if block else 0
        if done == 0:
            raise CheckpointError(f"short copy at byte {offset}: was the source truncated?")
        offset += done


class ShardPatcher:
    """Overwrite tensors of a copied shard in place, one at a time, sizes checked."""

    def __init__(self, target: Path):
        self.target = target
        with io_errors(target):
            self.handle = open(target, "r+b")  # noqa: SIM115 (closed in __exit__)

    def write(self, info: TensorInfo, tensor: torch.Tensor) -> None:
        data = tensor_buffer(tensor)
        if data.nbytes != info.nbytes:
            raise CheckpointError(
                f"internal error: {data.nbytes} bytes for a {info.nbytes}-byte slot"
            )
        with io_errors(self.target):
            self.handle.seek(info.start)
            self.handle.write(data)

    def __enter__(self) -> ShardPatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        with io_errors(self.target):
            self.handle.close()


def check_not_nested(output: Path, source: Path) -> None:
    """The output may neither sit inside the source nor contain it."""
    out = output.expanduser().resolve()
    src = source.resolve()
    if out == src or src in out.parents:
        raise InputError(f"output {output} is inside the source {source}; choose a folder outside")
    if out in src.parents:
        raise InputError(f"output {output} contains the source {source}; choose another folder")
