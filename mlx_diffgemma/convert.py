"""Hugging Face checkpoint -> MLX checkpoint (text only, optionally quantized), in bounded memory.

    python -m mlx_diffgemma.convert --hf-path google/diffusiongemma-26B-A4B-it --mlx-path dg-4bit -q

Three stages, so that every bad input is found before the first byte is written:
  plan:   read config.json and every shard's safetensors header (no tensor data), rename to the
          engine's names, check each tensor against the shapes config.json implies, resolve the
          recipe to one format per module, lay the output out in shards <= 5 GB, check free disk;
  write:  stream each source tensor in row chunks (quantization groups run along rows, so chunking
          is exact), cast / quantize, write every chunk at its planned offset: peak memory is a few
          chunks, whatever the model or tensor size;
  finish: copy tokenizer files, write config.json (with the per-module `quantization` block), the
          index and a model card, re-open and check every output tensor, then rename the temporary
          directory onto the target.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import quant
from .config import ConfigError, ModelConfig, read_json
from .files import atomic_dir

MAX_SHARD_BYTES = 5 * 10**9
CHUNK_BYTES = 64 * 2**20  # source bytes per chunk: bounds the working set
INDEX = "model.safetensors.index.json"
COPY_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "*.jinja",
                 "generation_config.json"]
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"]

# safetensors dtype code <-> (numpy storage dtype, mlx dtype); bf16 travels as uint16 bits
DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
    "U8": (np.uint8, mx.uint8),
}
CODES = {mx_dtype: code for code, (_, mx_dtype) in DTYPES.items()}
# every safetensors dtype, so that a non-float tensor outside the text model (dropped) still parses
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
              "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_CODES = ("F32", "F16", "BF16")
DTYPE_NAMES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class ConvertError(RuntimeError):
    """The conversion cannot go on; the message names the culprit and what to do."""


# -- reading: safetensors headers, then row chunks ------------------------------------------------


@dataclass
class SourceTensor:
    """One tensor of a source shard: where its bytes lie, nothing loaded."""

    name: str
    file: Path
    code: str
    shape: tuple
    start: int  # absolute byte offset in the file
    end: int

    @property
    def rows(self) -> int:  # the tensor seen as [rows, last dim]
        return _numel(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // max(self.rows, 1)

    def read_rows(self, r0: int, r1: int) -> mx.array:
        """Rows r0..r1 as an mx.array [r1 - r0, last dim] (1-D tensors: the whole tensor)."""
        np_dtype = DTYPES[self.code][0]
        cols = self.shape[-1] if self.shape else 1
        buf = np.empty((r1 - r0) * cols, dtype=np_dtype)
        with open(self.file, "rb") as f:
            f.seek(self.start + r0 * self.row_bytes)
            if f.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                raise ConvertError(f"{self.file}: ends inside tensor {self.name} (truncated); re-download it")
        a = mx.array(buf).reshape(r1 - r0, cols)
        return a.view(mx.bfloat16) if self.code == "BF16" else a


def read_header(path: Path) -> tuple[dict[str, SourceTensor], dict]:
    """Parse and check a safetensors header: (tensors by name, metadata). Reads no tensor data."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ValueError("header length is out of range")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({e}); re-download it") from None
    meta = header.pop("__metadata__", None) or {}
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            code, shape, (a, b) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: corrupt header entry for {name!r}; re-download the shard") from None
        if code not in ITEM_BYTES or b - a != _numel(shape) * ITEM_BYTES[code] or a < 0:
            raise ConvertError(f"{path}: header of tensor {name} is inconsistent (corrupt shard); re-download it")
        tensors[name] = SourceTensor(name, path, code, shape, 8 + n + a, 8 + n + b)
        spans.append((a, b))
    spans.sort()
    if any(b0 != a1 for (_, b0), (a1, _) in zip([(0, 0)] + spans, spans)):
        raise ConvertError(f"{path}: tensors overlap or leave gaps in the data (corrupt shard); re-download it")
    data_end = spans[-1][1] if spans else 0
    if 8 + n + data_end != size:
        raise ConvertError(
            f"{path}: truncated or corrupt shard (header describes {8 + n + data_end} bytes, file has {size}); "
            "re-download it"
        )
    return tensors, meta


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def find_shards(src: Path) -> list[Path]:
    """The shard files: those the index names (all must exist), else every *.safetensors."""
    index = src / INDEX
    if index.exists():
        try:
            names = sorted(set(read_json(index)["weight_map"].values()))
        except (ConfigError, KeyError, AttributeError, TypeError) as e:
            raise ConvertError(f"{index}: not a valid safetensors index ({e}); re-download it") from None
        for name in names:
            if not (src / name).is_file():
                raise ConvertError(f"{index} names {name}, which is missing from {src}; re-download the checkpoint")
        return [src / name for name in names]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{src}: no *.safetensors files; pass a Hugging Face checkpoint directory")
    return files


# -- planning ------------------------------------------------------------------------------------


@dataclass
class OutTensor:
    name: str
    shape: tuple
    dtype: mx.Dtype
    offset: int = 0  # within the shard's data section

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.size


@dataclass
class Job:
    """One source tensor and the output tensors it becomes (1, or 2-3 when quantized)."""

    source: SourceTensor
    fmt: quant.Format | None
    dtype: mx.Dtype
    outputs: list[OutTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass
class Shard:
    name: str = ""
    jobs: list[Job] = field(default_factory=list)
    header: bytes = b""

    @property
    def tensors(self) -> list[OutTensor]:
        return [t for j in self.jobs for t in j.outputs]

    @property
    def nbytes(self) -> int:
        return 8 + len(self.header) + sum(j.nbytes for j in self.jobs)


@dataclass
class Plan:
    src: Path
    config: ModelConfig
    raw_config: dict
    recipe: quant.Recipe | None
    choices: dict
    shards: list[Shard]
    source_bytes: int

    @property
    def out_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


def text_tensors(tensors: dict[str, SourceTensor], config: ModelConfig) -> dict[str, SourceTensor]:
    """Engine name -> source tensor: the text weights only (decoder copy preferred), renamed once."""
    from .names import sanitize

    dec, enc = "model.decoder.", "model.encoder.language_model."
    if any(k.startswith(dec) for k in tensors):
        for name, t in tensors.items():  # the encoder's duplicate layer_scalars must agree
            twin = tensors.get(dec + name[len(enc):]) if name.startswith(enc) else None
            if twin is not None and not _same(t, twin):
                raise ConvertError(
                    f"{name} ({t.file.name}) differs from {twin.name} ({twin.file.name}); "
                    "the checkpoint's encoder and decoder copies disagree: re-download it"
                )
    return sanitize(tensors, config)


def _same(a: SourceTensor, b: SourceTensor) -> bool:
    if a.shape != b.shape:
        return False
    for r0, r1 in _chunks(a):
        if not mx.array_equal(a.read_rows(r0, r1).astype(mx.float32), b.read_rows(r0, r1).astype(mx.float32)).item():
            return False
    return True


def _chunks(t: SourceTensor, chunk_bytes: int = CHUNK_BYTES):
    step = max(1, chunk_bytes // max(t.row_bytes, 1))
    for r0 in range(0, t.rows, step):
        yield r0, min(t.rows, r0 + step)


def expected_parameters(config: ModelConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(parameter name -> shape, quantizable module path -> weight shape) of the engine's model."""
    from mlx.utils import tree_flatten

    from .model import DiffusionGemma

    model = DiffusionGemma(config)  # lazy: shapes only
    params = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    return params, quant.quantizable_modules(model)


def make_plan(
    src: Path,
    recipe: quant.Recipe | None = None,
    dtype: mx.Dtype | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Plan:
    """Check the source completely and lay out the output, reading headers only."""
    cfg_path = src / "config.json"
    try:
        raw = read_json(cfg_path)
        config = ModelConfig.from_dict(raw, source=str(cfg_path))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    if raw.get("quantization") or raw.get("quantization_config"):
        raise ConvertError(f"{cfg_path}: the checkpoint is already quantized; convert the bf16 original")

    tensors: dict[str, SourceTensor] = {}
    for path in find_shards(src):
        found, _ = read_header(path)
        tensors.update(found)
    source_bytes = sum(t.end - t.start for t in tensors.values())
    named = text_tensors(tensors, config)

    params, modules = expected_parameters(config)
    for name, shape in params.items():
        if name not in named:
            raise ConvertError(
                f"tensor {name} (model.decoder.{_hf_name(name)}) is missing from {src}; "
                "the checkpoint is incomplete or does not match config.json: re-download it"
            )
        if named[name].shape != shape:
            raise ConvertError(
                f"{named[name].name} in {named[name].file.name} has shape {list(named[name].shape)}, "
                f"config.json implies {list(shape)}; the shard and config.json do not match"
            )
    for name, t in named.items():
        if name not in params:
            raise ConvertError(
                f"{t.name} in {t.file.name} is not a weight of the text model config.json describes; "
                "is this a diffusion_gemma checkpoint?"
            )
        if t.code not in FLOAT_CODES:
            raise ConvertError(f"{t.name} in {t.file.name} has dtype {t.code}; expected a float checkpoint")

    try:
        choices = quant.resolve(recipe, modules) if recipe else {}
    except ValueError as e:
        raise ConvertError(str(e)) from None

    jobs = []
    # output in source order: reads and writes both stay sequential
    for name, t in sorted(named.items(), key=lambda kv: (str(kv[1].file), kv[1].start)):
        out_dtype = dtype or DTYPES[t.code][1]
        path = name[: -len(".weight")] if name.endswith(".weight") else None
        fmt = choices.get(path)
        if fmt is None:
            outputs = [OutTensor(name, t.shape, out_dtype)]
        else:
            outputs = [OutTensor(f"{path}.{part}", s, d) for part, s, d in quant.quantized_parts(t.shape, fmt, out_dtype)]
        jobs.append(Job(t, fmt, out_dtype, outputs))
    return Plan(src, config, raw, recipe, choices, _layout(jobs, max_shard_bytes), source_bytes)


def _hf_name(name: str) -> str:
    for suffix in ("experts.gate_up_proj.weight", "experts.down_proj.weight"):
        if name.endswith(suffix):
            return name[: -len(".weight")]
    return name


def _layout(jobs: list[Job], max_shard_bytes: int) -> list[Shard]:
    """Greedy shards of at most max_shard_bytes (a bigger job gets a shard of its own), with headers."""
    shards = [Shard()]
    size = 0
    for job in jobs:
        if shards[-1].jobs and size + job.nbytes > max_shard_bytes:
            shards.append(Shard())
            size = 0
        shards[-1].jobs.append(job)
        size += job.nbytes
    n = len(shards)
    for i, shard in enumerate(shards):
        shard.name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for t in shard.tensors:
            t.offset = offset
            header[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        shard.header = text + b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned, as safetensors pads
    return shards


# -- writing -------------------------------------------------------------------------------------


def write_shard(shard: Shard, path: Path, on_tensor=None) -> int:
    """Stream every job of `shard` into `path`; returns source bytes read."""
    data0 = 8 + len(shard.header)
    read = 0
    with open(path, "wb") as f:
        f.write(len(shard.header).to_bytes(8, "little"))
        f.write(shard.header)
        f.truncate(data0 + sum(j.nbytes for j in shard.jobs))
        for job in shard.jobs:
            read += _write_job(job, f, data0)
            if on_tensor:
                on_tensor(job)
        f.flush()
        os.fsync(f.fileno())
    return read


def _write_job(job: Job, f, data0: int) -> int:
    t = job.source
    written = [0] * len(job.outputs)
    # MLX's CPU mxfp4/nvfp4/mxfp8 quantization holds ~8 fp32 copies of its input at once (+1.1 GB
    # for a 64 MB bf16 chunk, +0.18 GB for a quarter of it): feed it quarter-size chunks
    chunk = CHUNK_BYTES if job.fmt is None or job.fmt.mode == "affine" else CHUNK_BYTES // 4
    for r0, r1 in _chunks(t, chunk):
        x = t.read_rows(r0, r1)
        # a sum is finite iff every value is (weights are far from overflow); 10x cheaper than isfinite
        if not mx.isfinite((x.astype(mx.float32) if x.dtype == mx.float16 else x).sum()).item():
            raise ConvertError(
                f"{t.name} in {t.file} holds NaN or infinite values (rows {r0}..{r1}); the shard is corrupt: re-download it"
            )
        x = x.astype(job.dtype)
        parts = [x] if job.fmt is None else mx.quantize(x, job.fmt.group_size, job.fmt.bits, mode=job.fmt.mode)
        for i, (out, p) in enumerate(zip(job.outputs, parts)):
            data = _bytes(p)
            f.seek(data0 + out.offset + written[i])
            f.write(data)
            written[i] += len(data)
    for out, n in zip(job.outputs, written):
        if n != out.nbytes:  # a planning bug, never user input
            raise AssertionError(f"{out.name}: wrote {n} bytes, planned {out.nbytes}")
    return t.end - t.start


def _bytes(a: mx.array) -> memoryview:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(a))).cast("B")


# -- finishing -----------------------------------------------------------------------------------


def write_index(plan: Plan, out: Path) -> None:
    weight_map = {t.name: s.name for s in plan.shards for t in s.tensors}
    params = sum(_numel(j.source.shape) for s in plan.shards for j in s.jobs)
    index = {
        "metadata": {"total_size": sum(t.nbytes for s in plan.shards for t in s.tensors), "total_parameters": params},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / INDEX).write_text(json.dumps(index, indent=4))


def output_config(plan: Plan, dtype_name: str) -> dict:
    """The source config.json, text only, with the per-module quantization block when quantized."""
    cfg = {k: v for k, v in plan.raw_config.items() if k not in ("vision_config", "_name_or_path")}
    cfg["dtype"] = dtype_name
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = {**cfg["text_config"], "dtype": dtype_name}
    if plan.recipe is not None:
        block = quant.quantization_block(plan.recipe, plan.choices)
        cfg["quantization"] = block
        cfg["quantization_config"] = block  # the mirror hub tooling reads
    return dict(sorted(cfg.items()))


def model_card(plan: Plan, source_name: str, dtype_name: str) -> str:
    recipe = plan.recipe
    size = plan.out_bytes
    params = sum(_numel(j.source.shape) for s in plan.shards for j in s.jobs)
    hub = "/" in source_name and not source_name.startswith((".", "/", "~"))
    origin = f"[{source_name}](https://huggingface.co/{source_name})" if hub else f"the local checkpoint `{source_name}`"
    quant_line = (
        f"quantized with the `{recipe.name}` recipe ({recipe.about}); "
        f"{8 * size / params:.2f} bits per weight" if recipe else f"unquantized ({dtype_name})"
    )
    return (
        "---\n"
        f"base_model: {source_name}\n"
        "library_name: mlx\n"
        "pipeline_tag: text-generation\n"
        "tags:\n- mlx\n- diffusion_gemma\n- mlx-diffgemma\n"
        "---\n\n"
        f"# {source_name} (MLX, text only)\n\n"
        f"Converted from {origin} with `mlx_diffgemma.convert`: "
        f"{quant_line}; {size / 1e9:.2f} GB in {len(plan.shards)} shard(s). The vision tower is not included.\n\n"
        "```python\nimport mlx_diffgemma as dg\n\n"
        'model, tokenizer = dg.load("path/to/this/folder")\n'
        'print(dg.generate(model, tokenizer, "Why is the sky blue?"))\n```\n'
    )


def copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in COPY_PATTERNS):
            shutil.copy2(p, out / p.name)
            copied.append(p.name)
    return copied


def verify(plan: Plan, out: Path) -> None:
    """Re-open the output: every shard's header, names, shapes and dtypes as planned, safetensors'
    own reader agrees, and the engine can build the model from it (lazily: no data is read)."""
    from safetensors import safe_open

    from .loading import LoadError, build_model

    for shard in plan.shards:
        path = out / shard.name
        found, meta = read_header(path)
        planned = {t.name: (t.shape, CODES[t.dtype]) for t in shard.tensors}
        got = {n: (t.shape, t.code) for n, t in found.items()}
        if got != planned or meta.get("format") != "mlx":
            raise ConvertError(f"{path}: written tensors differ from the plan (disk error?); nothing was replaced")
        with safe_open(str(path), framework="numpy") as f:
            if set(f.keys()) != set(planned):
                raise ConvertError(f"{path}: safetensors reads other names than were written; nothing was replaced")
    try:
        build_model(out, lazy=True)
    except LoadError as e:
        raise ConvertError(f"the converted model does not load ({e}); nothing was replaced") from None


# -- the whole conversion ------------------------------------------------------------------------


def resolve_source(hf_path) -> tuple[Path, str]:
    """(local directory, name for the model card); a hub id is downloaded (only the files needed)."""
    from .loading import LoadError, resolve

    p = Path(hf_path).expanduser()
    if p.exists() and p.is_dir() and not os.access(p, os.R_OK | os.X_OK):
        raise ConvertError(f"{p}: directory is not readable (permission denied); fix its permissions")
    try:
        local = resolve(hf_path, allow_patterns=HUB_PATTERNS)
    except LoadError as e:
        msg = str(e)
        if "could not download" in msg:
            msg += " (offline? download it where the network allows, then pass the directory)"
        raise ConvertError(msg) from None
    return local, (str(hf_path) if not p.exists() else local.resolve().name)


def convert(
    hf_path,
    mlx_path,
    quantize: bool = False,
    recipe: str | None = None,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    max_shard_size: int = MAX_SHARD_BYTES,
    log=None,
) -> Path:
    """Convert a DiffusionGemma Hugging Face checkpoint (directory or hub id) to an MLX directory.

    `quantize` (or any `recipe`) stores the model quantized with `recipe` (default "mixed"; see
    `mlx_diffgemma.quant.RECIPES`); `q_bits`/`q_group_size`/`q_mode` set the bulk format of the
    `mixed` (experts) and `uniform` (everything) recipes. `dtype` ("bfloat16", "float16",
    "float32") is what unquantized tensors and quantization scales are stored in (default: the
    source's). Raises ConvertError with a one-line message; on any error or interrupt nothing is
    left at `mlx_path` (an existing one is kept unless the conversion succeeds with `force`).
    Returns the output directory."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    dtype_mx = None
    if dtype is not None:
        if dtype not in DTYPE_NAMES:
            raise ConvertError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        dtype_mx = DTYPE_NAMES[dtype]
    quantized = quantize or recipe is not None or any(v is not None for v in (q_bits, q_group_size, q_mode))
    try:
        chosen = quant.get_recipe(recipe, q_bits, q_group_size, q_mode) if quantized else None
    except ValueError as e:
        raise ConvertError(str(e)) from None

    out = Path(mlx_path).expanduser().absolute()
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it, or choose another --mlx-path")
    src, source_name = resolve_source(hf_path)
    if out == src.absolute() or src.absolute() in out.parents or out in src.absolute().parents:
        raise ConvertError(f"--mlx-path {out} overlaps the source {src}; choose a separate directory")

    plan = make_plan(src, chosen, dtype_mx, max_shard_size)
    need = plan.out_bytes + 64 * 2**20  # + tokenizer, config, slack
    existing = next(p for p in out.parents if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ConvertError(
            f"{existing}: the converted model needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free; "
            "free some space or choose another --mlx-path"
        )
    dtype_name = dtype or _dtype_name(plan)
    log(f"[convert] {src} -> {out}: {plan.source_bytes / 1e9:.2f} GB in, {plan.out_bytes / 1e9:.2f} GB out, "
        f"{len(plan.shards)} shard(s), " + (f"recipe {chosen.name}" if chosen else f"unquantized {dtype_name}"))

    if not any(p.name.startswith("tokenizer") for p in src.iterdir()):
        log(f"[convert] warning: {src} has no tokenizer files; copy them into {out} before loading it")
    text_bytes = sum(j.source.end - j.source.start for s in plan.shards for j in s.jobs)
    progress = {"read": 0, "next": 2**30}

    def on_tensor(job):  # a line per GiB read: the real model takes minutes per shard
        progress["read"] += job.source.end - job.source.start
        if progress["read"] >= progress["next"]:
            progress["next"] = progress["read"] + 2**30
            log(f"[convert] {progress['read'] / 1e9:.1f} / {text_bytes / 1e9:.1f} GB ({time.perf_counter() - t0:.0f} s)")

    read = 0
    with atomic_dir(out, "converting") as tmp:  # --force: the old directory goes only once the new one is in
        for shard in plan.shards:
            read += write_shard(shard, tmp / shard.name, on_tensor)
            log(f"[convert] wrote {shard.name} ({shard.nbytes / 1e9:.2f} GB)")
        write_index(plan, tmp)
        (tmp / "config.json").write_text(json.dumps(output_config(plan, dtype_name), indent=4))
        copy_side_files(src, tmp)
        (tmp / "README.md").write_text(model_card(plan, source_name, dtype_name))
        verify(plan, tmp)
    seconds = time.perf_counter() - t0
    log(f"[convert] done in {seconds:.1f} s ({read / 1e9 / seconds:.2f} GB/s read): {out}")
    return out


def _dtype_name(plan: Plan) -> str:
    codes = {j.source.code for s in plan.shards for j in s.jobs}
    return {"F32": "float32", "F16": "float16"}.get(codes.pop(), "bfloat16") if len(codes) == 1 else "bfloat16"


def main(argv=None) -> int:
    """`python -m mlx_diffgemma.convert`: exit 0 on success, 2 on bad input, 130 on Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m mlx_diffgemma.convert",
        description="Convert a DiffusionGemma Hugging Face checkpoint to MLX (text only, optionally quantized).",
    )
    parser.add_argument("--hf-path", required=True, help="local checkpoint directory or hub id")
    parser.add_argument("--mlx-path", default="mlx_model", help="output directory (default: mlx_model)")
    parser.add_argument("-q", "--quantize", action="store_true", help=f"quantize with the {quant.DEFAULT_RECIPE!r} recipe")
    parser.add_argument("--recipe", choices=sorted({*quant.RECIPES, "uniform"}), help="quantization recipe (implies -q)")
    parser.add_argument("--q-bits", type=int, help="bits of the recipe's bulk format (mixed: experts; uniform: all)")
    parser.add_argument("--q-group-size", type=int, help="group size of the bulk format")
    parser.add_argument("--q-mode", choices=list(quant.MODES), help="mode of the bulk format")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), help="dtype of unquantized tensors and scales (default: the source's)")
    parser.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    args = parser.parse_args(argv)

    def on_term(signum, frame):  # treat a polite kill like Ctrl-C: clean up, then leave
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        convert(args.hf_path, args.mlx_path, quantize=args.quantize, recipe=args.recipe, q_bits=args.q_bits,
                q_group_size=args.q_group_size, q_mode=args.q_mode, dtype=args.dtype, force=args.force, log=log)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.mlx_path}", file=sys.stderr)
        return 130
    except OSError as e:  # disk full mid-way, permissions on the target: one line, nothing left behind
        print(f"error: {e.filename or args.mlx_path}: {e.strerror or e}; nothing was written", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
