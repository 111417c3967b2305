"""An OpenAI-compatible HTTP server: `python -m mlx_diffgemma.server --model PATH`.

Endpoints: POST /v1/chat/completions and /v1/completions (JSON or SSE streaming), GET /v1/models,
GET /health. Standard library HTTP (`ThreadingHTTPServer`): one thread per connection parses,
validates and answers; exactly one worker thread owns the model, because MLX arrays and streams
belong to the thread that made them. Connections hand the worker jobs through a bounded queue
(429 when full, 503 while shutting down) and read its events back, one canvas at a time.

The diffusion knobs are extra body fields: `max_denoising_steps`, `entropy_bound`, `t_min`,
`t_max`, `stability_threshold`, `confidence_threshold`, and the standard `seed`. See docs/server.md.
"""

from __future__ import annotations

import hmac
import inspect
import itertools
import json
import os
import queue
import secrets
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

SAMPLER_KNOBS = {  # extra body field -> (type, check, what it must be)
    "max_denoising_steps": (int, lambda v: v >= 1, "an integer >= 1"),
    "entropy_bound": (float, lambda v: v > 0, "a number > 0"),
    "t_min": (float, lambda v: v >= 0, "a number >= 0"),
    "t_max": (float, lambda v: v > 0, "a number > 0"),
    "stability_threshold": (int, lambda v: v >= 0, "an integer >= 0"),
    "confidence_threshold": (float, lambda v: v > 0, "a number > 0"),
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_prompt_tokens: int = 32768
    max_tokens: int = 4096  # the most a request may ask for
    max_body_bytes: int = 1 << 20
    max_queue: int = 16  # jobs waiting behind the running one
    max_denoising_steps: int = 1024
    prefix_cache: int = 8  # KV-cache snapshots kept for prefix reuse (0: off)


# ---------------------------------------------------------------------------------------------
# Request parsing: body (dict) -> GenRequest, or APIError naming the culprit.


@dataclass
class GenRequest:
    endpoint: str  # "chat" | "completion"
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    thinking: bool = False
    max_tokens: int | None = None
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False


def _typed(body: dict, key: str, kind, check=None, what: str = "", default=None):
    """body[key] checked for type (bool is not a number here) and range; None means absent."""
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, int) and not isinstance(value, bool) if kind is int else
        isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300 if kind is float else
        isinstance(value, kind))
    if not ok or (check is not None and not check(value)):
        name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                dict: "an object", list: "an array"}[kind]
        raise APIError(400, f"'{key}' must be {what or name}, got {json.dumps(value)[:80]}", param=key,
                       code="invalid_type" if not ok else "invalid_value")
    return float(value) if kind is float else value


def _common(body: dict, req: GenRequest, limits: Limits) -> GenRequest:
    _typed(body, "model", str)
    n = _typed(body, "n", int)
    if n not in (None, 1):
        raise APIError(400, f"'n' must be 1 (one canvas sequence per request), got {n}", param="n")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _typed(body, key, float)
    if body.get("stop") not in (None, [], ""):
        raise APIError(400, "'stop' sequences are not supported; remove the field", param="stop",
                       code="unsupported_parameter")
    lim = limits.max_tokens
    max_tokens = _typed(body, "max_completion_tokens", int, lambda v: 1 <= v <= lim, f"an integer in [1, {lim}]")
    max_tokens = _typed(body, "max_tokens", int, lambda v: 1 <= v <= lim, f"an integer in [1, {lim}]",
                        default=max_tokens)
    req.max_tokens = max_tokens
    seed = _typed(body, "seed", int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")
    req.seed = secrets.randbelow(2**31) if seed is None else seed
    req.stream = _typed(body, "stream", bool, default=False)
    opts = _typed(body, "stream_options", dict, default={})
    req.include_usage = _typed(opts, "include_usage", bool, default=False)
    for key, (kind, check, what) in SAMPLER_KNOBS.items():
        value = _typed(body, key, kind, check, what)
        if value is not None:
            req.overrides[key] = value
    steps = req.overrides.get("max_denoising_steps")
    if steps is not None and steps > limits.max_denoising_steps:
        raise APIError(400, f"'max_denoising_steps' must be <= {limits.max_denoising_steps}, got {steps}",
                       param="max_denoising_steps")
    return req


def _content_text(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}.content[{i}]: only text parts are supported, got {kind!r}",
                               param=f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content",
                   code="invalid_type")


def parse_chat(body: dict, limits: Limits) -> GenRequest:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise APIError(400, "'messages' must be an array of {role, content} objects", param="messages",
                       code="invalid_type" if messages is not None else "missing_required_parameter")
    if not messages:
        raise APIError(400, "'messages' is empty; send at least one user message", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where,
                           code="invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role {json.dumps(role)} is not supported; use one of "
                           f"{', '.join(ROLES)}", param=f"{where}.role")
        text = _content_text(m.get("content"), where)
        if not text.strip() and role != "assistant":
            raise APIError(400, f"{where}.content is empty", param=f"{where}.content")
        out.append({"role": ROLES[role], "content": text})
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tool calling is not supported by this server yet; remove 'tools'", param="tools",
                       code="unsupported_parameter")
    if all(m["role"] == "system" for m in out):
        raise APIError(400, "'messages' holds no user turn; add a user message", param="messages")
    req = GenRequest("chat", messages=out)
    req.thinking = _thinking(body)
    return _common(body, req, limits)


def _thinking(body: dict) -> bool:
    """Thinking on: `thinking: true`, `chat_template_kwargs.enable_thinking`, or a reasoning_effort
    other than "none"/"minimal"."""
    thinking = _typed(body, "thinking", bool)
    kwargs = _typed(body, "chat_template_kwargs", dict, default={})
    enable = _typed(kwargs, "enable_thinking", bool)
    effort = _typed(body, "reasoning_effort", str, lambda v: v in ("none", "minimal", "low", "medium", "high"),
                    "one of none, minimal, low, medium, high")
    for choice in (thinking, enable):
        if choice is not None:
            return choice
    return effort is not None and effort not in ("none", "minimal")


def parse_completion(body: dict, limits: Limits) -> GenRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise APIError(400, "'prompt' must be a string, or one array of token ids (batches are not "
                           "supported; send one request per prompt)", param="prompt", code="invalid_type")
    elif isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "'prompt' is empty", param="prompt")
    else:
        raise APIError(400, "'prompt' must be a string or an array of token ids", param="prompt",
                       code="invalid_type" if prompt is not None else "missing_required_parameter")
    for key in ("echo", "logprobs", "suffix", "best_of"):
        if body.get(key) not in (None, False, 1 if key == "best_of" else None):
            raise APIError(400, f"'{key}' is not supported; remove the field", param=key,
                           code="unsupported_parameter")
    return _common(body, GenRequest("completion", prompt=prompt), limits)


# ---------------------------------------------------------------------------------------------
# The worker: the one thread that touches the model.


class Job:
    """One request in flight: the worker writes `events`, the connection's thread reads them."""

    _ids = itertools.count()

    def __init__(self, request: GenRequest):
        self.request = request
        self.number = next(self._ids)
        self.events: queue.Queue = queue.Queue()  # at most one message per canvas, so bounded in practice
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()

    def emit(self, kind: str, **payload):
        self.events.put((kind, payload))


class PrefixCache:
    """A small LRU of KV-cache snapshots keyed by the token ids they hold; `lookup` returns a copy
    of the longest snapshot that is a prefix of the given ids (copies share the immutable arrays)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = self.misses = 0

    def lookup(self, ids: list[int], limit: int):
        best = None
        for key in self.entries:
            if len(key) <= limit and (best is None or len(key) > len(best)) and tuple(ids[:len(key)]) == key:
                best = key
        if best is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        self.entries.move_to_end(best)
        return self.entries[best].copy(), len(best)

    def store(self, ids: list[int], cache):
        if self.capacity <= 0 or not ids:
            return
        self.entries[tuple(ids)] = cache.copy()
        self.entries.move_to_end(tuple(ids))
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class Engine:
    """Owns the model on one worker thread. `submit` enqueues a Job (429 when the queue is full,
    503 when closing); the worker runs jobs one at a time and emits "start", "delta", "done" or
    "error" on each job's event queue. `stream_fn` replaces `stream_generate` (tests)."""

    def __init__(self, model_path: str, limits: Limits, stream_fn: Callable | None = None,
                 loader: Callable | None = None, loop: str = "auto"):
        self.model_path, self.limits, self.loop = model_path, limits, loop
        self.stream_fn, self.loader = stream_fn, loader
        self.jobs: queue.Queue = queue.Queue(maxsize=limits.max_queue)
        self.prefix = PrefixCache(limits.prefix_cache)
        self.closing = False
        self.running: Job | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.gen_config = None
        self.context_length: int | None = None
        self.served = 0
        self.thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)

    # -- the connections' side --

    def start(self, timeout: float | None = None):
        """Start the worker and load the model on it; re-raises a load error."""
        self.thread.start()
        self.ready.wait(timeout)
        if self.load_error is not None:
            raise self.load_error

    def submit(self, job: Job):
        if self.closing:
            raise APIError(503, "the server is shutting down; retry on another instance", code="shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the request queue is full ({self.limits.max_queue} waiting); retry later",
                           code="queue_full", type="rate_limit_error") from None

    def check_overrides(self, req: GenRequest):
        """The sampler knobs as the engine will see them (t_min < t_max and so on), before queueing."""
        try:
            self.gen_config.override(max_new_tokens=req.max_tokens, **req.overrides)
        except (TypeError, ValueError) as e:
            raise APIError(400, str(e)) from None

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self, grace: float = 30.0):
        """Refuse new jobs, answer queued ones 503, let the running one finish (cancelled after
        `grace` seconds), then stop the worker."""
        self.closing = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", error=APIError(503, "the server is shutting down", code="shutting_down"))
        deadline = time.monotonic() + grace
        while self.running is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.running is not None:
            self.running.cancel()
        try:
            self.jobs.put(None, timeout=grace)
        except queue.Full:
            pass
        self.thread.join(timeout=grace)

    # -- the worker's side --

    def _run(self):
        try:
            if self.loader is not None:
                self.model, self.tokenizer = self.loader(self.model_path)
            else:
                from .loading import load

                self.model, self.tokenizer = load(self.model_path)
            self.gen_config = self.model.generation_config
            raw = getattr(getattr(self.model, "config", None), "raw", None) or {}
            text = raw.get("text_config", raw)
            self.context_length = text.get("max_position_embeddings") if isinstance(text, dict) else None
            self.inline = None
            if self.stream_fn is None:
                from . import generate

                self.stream_fn = generate.stream_generate
                self.inline = _inline_loop(generate) if self.loop == "auto" else None
            if hasattr(self.model, "named_modules"):
                _settle(self.model)
            self.takes_cancel = "cancel" in inspect.signature(self.stream_fn).parameters
        except BaseException as e:  # reported by start(); the worker ends
            self.load_error = e
            self.ready.set()
            return
        self.ready.set()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self.running = job
            try:
                self._serve(job)
            except APIError as e:
                job.emit("error", error=e)
            except ValueError as e:  # the engine's one-line verdict on the request (prompt too long, ...)
                job.emit("error", error=APIError(400, str(e)))
            except Exception as e:  # a bug must not take the server down: answer 500, keep serving
                traceback.print_exc(file=sys.stderr)
                job.emit("error", error=APIError(500, f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self.running = None
                self.served += 1
                self._release_memory()

    def _release_memory(self):
        try:
            import mlx.core as mx

            mx.clear_cache()  # freed buffers go back to the system, so memory stays flat between requests
        except Exception:
            pass

    def _prompt_ids(self, req: GenRequest) -> tuple[list[int], int]:
        """(prompt ids, the length of the reusable prefix). For chat the prefix is the conversation
        without the generation prompt, so the next turn of the same conversation finds it cached."""
        from .tokenizer import encode_text, render_chat

        tok = self.tokenizer
        if req.endpoint == "completion":
            ids = list(req.prompt) if isinstance(req.prompt, list) else list(tok.encode(req.prompt))
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise APIError(400, f"'prompt' holds token id {bad[0]} outside the vocabulary (size {vocab})",
                               param="prompt")
            return ids, len(ids) - 1
        ids = encode_text(tok, render_chat(tok, req.messages, thinking=req.thinking))
        head = encode_text(tok, render_chat(tok, req.messages, thinking=req.thinking, add_generation_prompt=False))
        p = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
        return ids, min(p, len(ids) - 1)

    def _serve(self, job: Job):
        from .tokenizer import TextStream

        req, limits = job.request, self.limits
        ids, p = self._prompt_ids(req)
        where = "messages" if req.messages else "prompt"
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param=where)
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than the limit of "
                           f"{limits.max_prompt_tokens}; shorten it", code="context_length_exceeded", param=where)
        max_tokens = req.max_tokens or self.gen_config.max_new_tokens
        if self.context_length and len(ids) + max_tokens > self.context_length:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                           f"context of {self.context_length}", code="context_length_exceeded", param="max_tokens")

        # reuse the longest cached prefix, then snapshot the conversation prefix for the next turn
        cache, cached = None, 0
        if limits.prefix_cache > 0 and p > 0:
            cache, cached = self.prefix.lookup(ids, limit=p)
            if cache is None:
                cache = self.model.make_cache()
            if cached < p:
                import mlx.core as mx

                self.model.encode(mx.array([ids[cached:p]]), cache)
                mx.eval(*cache.state())  # evaluated here: the engine may read it from its own thread
                self.prefix.store(ids[:p], cache)
        else:
            p = 0
        job.emit("start", prompt_tokens=len(ids), cached_tokens=cached)

        # the answer is re-parsed from the committed tokens (cut at max_tokens) with the engine's
        # own TextStream, so content / reasoning here are exactly what the engine would show
        text = TextStream(self.tokenizer)
        thought = (TextStream.CHANNEL_NAME, TextStream.REASONING)
        eos = set(self.gen_config.eos_token_id)
        acc = {"produced": 0, "reasoning_tokens": 0, "hit_eos": False, "canvas_tokens": [], "done": None}

        def on_event(event):
            if event.kind == "commit":
                tokens = list(event.tokens)[: max_tokens - acc["produced"]]
                acc["canvas_tokens"].append(len(event.tokens))
                acc["produced"] += len(tokens)
                delta = {"reasoning": "", "content": ""}
                for t in tokens:
                    acc["reasoning_tokens"] += text.state in thought and t != text.markers.channel_end
                    acc["hit_eos"] = acc["hit_eos"] or t in eos
                    d = text.add(t)
                    delta["reasoning"] += d.reasoning
                    delta["content"] += d.content
                if delta["reasoning"] or delta["content"]:
                    job.emit("delta", **delta)
            elif event.kind == "done":
                acc["done"] = event
            # other kinds (step, text, preview, ...) carry nothing the API sends per canvas

        self._generate(job, on_event, ids[p:], max_tokens, cache)
        if job.cancelled.is_set():
            return
        produced, done = acc["produced"], acc["done"]
        d = text.finish()
        if d.reasoning or d.content:
            job.emit("delta", reasoning=d.reasoning, content=d.content)
        stats = done.stats if done is not None else None
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": produced,
            "total_tokens": len(ids) + produced,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": acc["reasoning_tokens"]},
            "canvases": len(acc["canvas_tokens"]),
            "canvas_tokens": acc["canvas_tokens"],
            "denoise_steps": stats.denoise_steps if stats else None,
            "steps_per_canvas": list(stats.steps_per_canvas) if stats else None,
        }
        job.emit("done", usage=usage, finish_reason="stop" if acc["hit_eos"] else "length",
                 reasoning=text.parsed.reasoning, content=text.parsed.content, seed=req.seed)

    def _generate(self, job: Job, on_event: Callable, prompt_ids: list[int], max_tokens: int, cache):
        """Run the block loop for `job`, handing every event to `on_event`, on this thread.

        The server's MLX work (prefix encoding included) all happens on this one worker, so it
        drives the engine's callback loop directly when its signature is the expected one; else
        it goes through the public `stream_generate` (which runs the loop on the engine's thread)."""
        req = job.request
        if self.inline is not None:
            self.inline(emit=on_event, stopped=job.cancelled.is_set, model=self.model, tokenizer=self.tokenizer,
                        prompt=prompt_ids, max_tokens=max_tokens, seed=req.seed, thinking=req.thinking,
                        generation_config=None, cache=cache, mode=None, tools=None, preview=False,
                        overrides=dict(req.overrides))
            return
        extra = {"cancel": job.cancelled} if self.takes_cancel else {}
        events = self.stream_fn(self.model, self.tokenizer, prompt_ids, max_tokens=max_tokens, seed=req.seed,
                                cache=cache, **extra, **req.overrides)
        try:
            for event in events:
                if job.cancelled.is_set():
                    return
                on_event(event)
        finally:
            events.close()  # a cancelled request stops here


_INLINE_PARAMS = ["emit", "stopped", "model", "tokenizer", "prompt", "max_tokens", "seed", "thinking",
                  "generation_config", "cache", "mode", "tools", "preview", "overrides"]


def _inline_loop(generate):
    """The engine's callback-driven block loop (`generate._generate`) when its signature is the one
    this server was written against; None otherwise (then `stream_generate` is used)."""
    loop = getattr(generate, "_generate", None)
    try:
        return loop if list(inspect.signature(loop).parameters) == _INLINE_PARAMS else None
    except (TypeError, ValueError):
        return None


def _settle(model):
    """Evaluate every array hanging off the model, parameters or not (RoPE tables are plain
    attributes): a lazy array can only be evaluated on the thread that made it (MLX streams are
    per thread). The engine's `generate.settle` when it has one."""
    try:
        from .generate import settle
    except ImportError:
        settle = None
    if settle is not None:
        return settle(model)
    import mlx.core as mx
    import mlx.nn as nn

    arrays = []
    for _, module in model.named_modules():
        for value in vars(module).values():
            if isinstance(value, mx.array):
                arrays.append(value)
            elif hasattr(value, "__dict__") and not isinstance(value, nn.Module):
                arrays.extend(v for v in vars(value).values() if isinstance(v, mx.array))
    mx.eval(model.parameters(), *arrays)


# ---------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx-diffgemma"
    timeout = 120  # seconds a connection may stall a read or write before it is dropped

    @property
    def app(self) -> "Server":
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):
        if self.app.verbose:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    # -- plumbing --

    def _send_json(self, status: int, obj: dict, headers: dict | None = None):
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True

    def _send_error(self, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        self._send_json(e.status, e.body(), headers)

    def _authorized(self) -> bool:
        key = self.app.api_key
        if not key:
            return True
        got = self.headers.get("Authorization", "")
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _read_json(self) -> dict:
        if self.headers.get("Transfer-Encoding", "identity").lower() != "identity":
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        length = self.headers.get("Content-Length")
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except (TypeError, ValueError):
            self.close_connection = True
            raise APIError(411 if length is None else 400, "a valid Content-Length header is required") from None
        limit = self.app.limits.max_body_bytes
        if length > limit:
            self.close_connection = True  # the unread body must not be parsed as the next request
            self._discard(min(length, 8 * limit))  # so that the client gets to read the answer
            raise APIError(413, f"the request body has {length} bytes, more than the limit of {limit}",
                           code="body_too_large")
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise APIError(400, "the request body ended early")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, RecursionError):
            raise APIError(400, "the request body is not valid UTF-8 JSON", code="invalid_json") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"the request body is not valid JSON ({e.msg} at char {e.pos})",
                           code="invalid_json") from None
        except ValueError as e:  # e.g. an integer literal longer than Python's digit limit
            raise APIError(400, f"the request body is not acceptable JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _discard(self, n: int):
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    return
                n -= len(chunk)
        except OSError:
            pass

    def _client_gone(self) -> bool:
        """The peer closed its end (EOF pending on the socket) while we were generating."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _next_event(self, job: Job):
        while True:
            try:
                return job.events.get(timeout=0.25)
            except queue.Empty:
                if self._client_gone():
                    job.cancel()
                    self.app.cancelled += 1
                    return None
                if not self.app.engine.alive:
                    if self.app.engine.closing:
                        return ("error", {"error": APIError(503, "the server is shutting down", code="shutting_down")})
                    return ("error", {"error": APIError(500, "the model worker stopped")})

    # -- routes --

    def do_GET(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            return self._send_json(*self.app.health())
        if not self._authorized():
            return self._send_error(APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                             code="invalid_api_key", type="authentication_error"))
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [self.app.model_card()]})
        if path.startswith("/v1/models/"):
            if path[len("/v1/models/"):] == self.app.model_name:
                return self._send_json(200, self.app.model_card())
            return self._send_error(APIError(404, f"model {path[len('/v1/models/'):]!r} is not served here",
                                             code="model_not_found"))
        self._send_error(APIError(404, f"no route GET {path}; see /v1/models, /health", code="not_found"))

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.startswith("/v1"):
            path = path[3:]
        try:
            if path not in ("/chat/completions", "/completions"):
                self.close_connection = True
                raise APIError(404, f"no route POST {self.path}; use /v1/chat/completions or /v1/completions",
                               code="not_found")
            if not self._authorized():
                self.close_connection = True
                raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               code="invalid_api_key", type="authentication_error")
            if self.app.engine.closing:
                self.close_connection = True
                raise APIError(503, "the server is shutting down", code="shutting_down")
            body = self._read_json()
            parse = parse_chat if path == "/chat/completions" else parse_completion
            req = parse(body, self.app.limits)
            self.app.engine.check_overrides(req)
            job = Job(req)
            self.app.engine.submit(job)
        except APIError as e:
            self.app.count_error(e.status)
            return self._send_error(e)
        except Exception as e:  # a bug in parsing must still get an answer
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            self.app.count_error(500)
            return self._send_error(APIError(500, f"internal error: {type(e).__name__}"))
        self._answer(job)

    def do_PUT(self):
        self.close_connection = True
        self._send_error(APIError(405, f"method PUT not allowed on {self.path}", code="method_not_allowed"))

    do_DELETE = do_PATCH = do_PUT

    def _answer(self, job: Job):
        first = self._next_event(job)
        if first is None:
            return
        kind, payload = first
        if kind == "error":
            self.app.count_error(payload["error"].status)
            return self._send_error(payload["error"])
        start = payload
        if job.request.stream:
            return self._stream(job, start)
        done = None
        while done is None:
            event = self._next_event(job)
            if event is None:
                return
            kind, payload = event
            if kind == "error":
                self.app.count_error(payload["error"].status)
                return self._send_error(payload["error"])
            if kind == "done":
                done = payload
        self.app.completed += 1
        self._send_json(200, self.app.response_body(job, done))

    def _stream(self, job: Job, start: dict):
        app, req = self.app, job.request
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream ends when the connection does
            self.end_headers()
            self.close_connection = True
            head = app.chunk(job, role=True)
            if head is not None:
                self._sse(head)
            while True:
                event = self._next_event(job)
                if event is None:
                    return
                kind, payload = event
                if kind == "error":
                    self._sse(payload["error"].body())
                    break
                if kind == "delta":
                    self._sse(app.chunk(job, reasoning=payload["reasoning"], content=payload["content"]))
                elif kind == "done":
                    self._sse(app.chunk(job, finish_reason=payload["finish_reason"]))
                    if req.include_usage:
                        self._sse(app.chunk(job, usage=payload["usage"]))
                    app.completed += 1
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            job.cancel()  # the client went away: stop generating at the next canvas
            app.cancelled += 1

    def _sse(self, obj: dict):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog (socketserver's 5 resets bursts of clients)


class Server:
    """The HTTP server plus the engine. `start()` loads the model and serves on a background
    thread; `serve_forever()` serves on the caller's; `shutdown()` drains and stops."""

    def __init__(self, model_path: str, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
                 limits: Limits | None = None, model_name: str | None = None, verbose: bool = False,
                 stream_fn: Callable | None = None, loader: Callable | None = None, loop: str = "auto"):
        self.limits = limits or Limits()
        self.api_key, self.verbose = api_key, verbose
        self.model_name = model_name or Path(str(model_path)).name or str(model_path)
        self.engine = Engine(model_path, self.limits, stream_fn=stream_fn, loader=loader, loop=loop)
        self.httpd = _HTTPServer((host, port), Handler)
        self.httpd.app = self  # type: ignore[attr-defined]
        self.created = int(time.time())
        self.completed = self.cancelled = 0
        self.errors: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def load(self):
        self.engine.start()

    def start(self) -> "Server":
        self.load()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        self.httpd.serve_forever()

    def shutdown(self, grace: float = 30.0):
        self.engine.close(grace)
        self.httpd.shutdown()
        self.httpd.server_close()

    def count_error(self, status: int):
        with self._lock:
            self.errors[status] = self.errors.get(status, 0) + 1

    def health(self) -> tuple[int, dict]:
        e = self.engine
        status = "shutting_down" if e.closing else ("ok" if e.alive else "worker_stopped")
        return (200 if status == "ok" else 503), {
            "status": status, "model": self.model_name, "queued": e.jobs.qsize(),
            "running": e.running is not None, "served": e.served, "completed": self.completed,
            "cancelled": self.cancelled, "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "prefix_cache": {"entries": len(e.prefix.entries), "hits": e.prefix.hits, "misses": e.prefix.misses},
            "rss_bytes": rss_bytes(),
        }

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mlx-diffgemma"}

    def _envelope(self, job: Job, chunk: bool) -> dict:
        chat = job.request.endpoint == "chat"
        obj = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.number:06d}{id(job) & 0xffff:04x}", "object": obj,
                "created": int(time.time()), "model": self.model_name}

    def response_body(self, job: Job, done: dict) -> dict:
        body = self._envelope(job, chunk=False)
        if job.request.endpoint == "chat":
            message = {"role": "assistant", "content": done["content"]}
            if done["reasoning"]:
                message["reasoning_content"] = done["reasoning"]
            choice = {"index": 0, "message": message, "finish_reason": done["finish_reason"]}
        else:
            choice = {"index": 0, "text": done["content"], "logprobs": None, "finish_reason": done["finish_reason"]}
        body.update(choices=[choice], usage=done["usage"], seed=done["seed"])
        return body

    def chunk(self, job: Job, role: bool = False, reasoning: str = "", content: str = "",
              finish_reason: str | None = None, usage: dict | None = None) -> dict | None:
        body = self._envelope(job, chunk=True)
        chat = job.request.endpoint == "chat"
        if usage is not None:
            body.update(choices=[], usage=usage)
            return body
        if role and not chat:
            return None
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
        body["choices"] = [choice]
        return body


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; macOS falls back to the peak)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mlx_diffgemma.server",
                                description="OpenAI-compatible server for DiffusionGemma.")
    p.add_argument("--model", "-m", required=True, help="model directory (converted or raw Hugging Face) or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("MLX_DIFFGEMMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MLX_DIFFGEMMA_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the id /v1/models reports (default: the folder name)")
    d = Limits()
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting behind the running one")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens, help="the largest max_tokens accepted")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-denoising-steps", type=int, default=d.max_denoising_steps,
                   help="the largest max_denoising_steps a request may ask for")
    p.add_argument("--prefix-cache", type=int, default=d.prefix_cache,
                   help="KV-cache snapshots kept for conversation-prefix reuse (0 disables)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds the running request may take to finish on SIGTERM/SIGINT")
    p.add_argument("--loop", choices=["auto", "stream"], default="auto",
                   help="diagnostic: 'stream' forces the engine's public stream_generate (a thread per request) "
                        "instead of driving its block loop on the worker")
    p.add_argument("--verbose", "-v", action="store_true", help="log every request")
    args = p.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    for name in ("max_queue", "max_prompt_tokens", "max_tokens_limit", "max_body_bytes", "max_denoising_steps"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prefix_cache < 0:
        return fail(f"--prefix-cache must be >= 0, got {args.prefix_cache}")
    if not 0 <= args.port <= 65535:
        return fail(f"--port must be in 0..65535, got {args.port}")
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                    max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
                    max_denoising_steps=args.max_denoising_steps, prefix_cache=args.prefix_cache)
    try:
        server = Server(args.model, args.host, args.port, args.api_key, limits, args.model_name, args.verbose,
                        loop=args.loop)
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pass another --port/--host")
    try:
        server.load()
    except Exception as e:
        from .loading import LoadError
        from .config import ConfigError

        server.httpd.server_close()
        if isinstance(e, (LoadError, ConfigError)):
            return fail(str(e))
        raise
    host, port = server.address
    if host not in ("127.0.0.1", "::1", "localhost") and not args.api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    print(f"serving {server.model_name} on http://{host}:{port}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True)

    def stop(signum, frame):
        # shutdown() waits for serve_forever, which runs on this (the main) thread: stop from another
        threading.Thread(target=server.shutdown, args=(args.shutdown_grace,), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
