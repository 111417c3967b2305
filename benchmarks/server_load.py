"""Load and soak test of the OpenAI-compatible server (`mlx_diffgemma.server`) on loopback.

    python -m benchmarks.server_load [--model PATH] [--requests 240] [--soak 300] [--out benchmarks/results]

1. Builds a tiny random checkpoint (unless --model), then starts two servers as subprocesses on
   free 127.0.0.1 ports: a *reference* server with prefix caching off, and the *load* server
   (prefix cache on, --api-key, a queue long enough for every client).
2. Runs every distinct request once, alone, on the reference server: the expected answers
   (generation is deterministic per seed).
3. Fires --requests requests at the load server from 8, then 32 concurrent clients: the distinct
   requests (chat / completion, streamed or not, thinking on or off, multi-turn conversations that
   share a prefix) mixed with malformed ones (bad JSON, wrong types, unknown roles, empty
   messages, an oversized body, a wrong API key) and clients that hang up mid-stream. Every answer
   is checked against the expected one: same text, reasoning, token counts, finish reason; every
   malformed request must get its 4xx with an OpenAI-style error body.
4. A soak of --soak sequential requests, sampling the server's RSS as it goes.

Writes benchmarks/results/server_load.json and .md. Loopback traffic only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlx_diffgemma.files import write_text_atomic

API_KEY = "bench-key"
KNOBS = {"max_denoising_steps": 3}
TOPICS = ["Why is the sky blue?", "Write a short poem about the sea.", "Solve this sudoku row.",
          "The quick brown fox jumps over the lazy dog.", "Diffusion models refine a canvas."]


# -- the workload --------------------------------------------------------------------------------


def distinct_requests() -> list[dict]:
    """Well-formed requests: (path, body). Seeds differ so that any mix-up shows."""
    reqs = []
    seed = 100
    for i, topic in enumerate(TOPICS):
        for stream in (False, True):
            for thinking in (False, True):
                seed += 1
                msgs = [{"role": "user", "content": topic}]
                if i % 2:
                    msgs.insert(0, {"role": "system", "content": "Be brief."})
                reqs.append(("/v1/chat/completions", dict(
                    messages=msgs, max_tokens=[8, 40, 64][seed % 3], seed=seed, stream=stream,
                    thinking=thinking, **KNOBS)))
        seed += 1
        reqs.append(("/v1/completions", dict(prompt=topic, max_tokens=[20, 48][i % 2], seed=seed,
                                             stream=bool(i % 2), **KNOBS)))
    # multi-turn conversations: later turns share the earlier turns' prefix (KV-cache reuse)
    for c in range(3):
        history = [{"role": "system", "content": "You answer in one line."}]
        for turn in range(3):
            seed += 1
            history = history + [{"role": "user", "content": f"{TOPICS[(c + turn) % len(TOPICS)]} (turn {turn})"}]
            reqs.append(("/v1/chat/completions", dict(messages=list(history), max_tokens=32, seed=seed, **KNOBS)))
            history = history + [{"role": "assistant", "content": f"Answer {c}.{turn}: blue light scatters."}]
    return reqs


def malformed_requests() -> list[tuple[str, bytes, dict, int]]:
    """(path, raw body, extra headers, expected status)."""
    ok_msgs = [{"role": "user", "content": "hi"}]
    j = lambda o: json.dumps(o).encode()  # noqa: E731
    return [
        ("/v1/chat/completions", b'{"messages": [', {}, 400),
        ("/v1/chat/completions", b"\xff\xfe\x00", {}, 400),
        ("/v1/chat/completions", j([1, 2, 3]), {}, 400),
        ("/v1/chat/completions", j({"messages": []}), {}, 400),
        ("/v1/chat/completions", j({"messages": [{"role": "wizard", "content": "hi"}]}), {}, 400),
        ("/v1/chat/completions", j({"messages": [{"role": "user", "content": ""}]}), {}, 400),
        ("/v1/chat/completions", j({"messages": ok_msgs, "max_tokens": "8"}), {}, 400),
        ("/v1/chat/completions", j({"messages": ok_msgs, "max_denoising_steps": -1}), {}, 400),
        ("/v1/chat/completions", j({"messages": ok_msgs, "t_min": 0.9, "t_max": 0.2}), {}, 400),
        ("/v1/completions", j({"prompt": 5}), {}, 400),
        ("/v1/completions", j({"prompt": [10**9]}), {}, 400),
        ("/v1/chat/completions", j({"messages": ok_msgs, "pad": "x" * (300 << 10)}), {}, 413),
        ("/v1/chat/completions", j({"messages": ok_msgs}), {"Authorization": "Bearer wrong"}, 401),
        ("/v1/unknown", j({}), {}, 404),
    ]


# -- a tiny HTTP client --------------------------------------------------------------------------


def post(port: int, path: str, body: bytes, headers: dict | None = None, hang_up_after: int | None = None):
    """(status, parsed answer, seconds). Streams are parsed into the same shape as plain answers.
    `hang_up_after`: read that many SSE events, then close the connection (a client that leaves)."""
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    h.update(headers or {})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", path, body=body, headers=h)
        r = conn.getresponse()
        if r.getheader("Content-Type", "").startswith("text/event-stream"):
            out = read_sse(r, hang_up_after)
        else:
            data = r.read()
            out = json.loads(data) if data else None
        return r.status, out, time.perf_counter() - t0
    finally:
        conn.close()


def read_sse(r, hang_up_after=None) -> dict:
    content, reasoning, finish, usage, events, error = "", "", None, None, 0, None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        events += 1
        if "error" in obj:
            error = obj["error"]
            continue
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices", []):
            delta = ch.get("delta", ch)
            content += delta.get("content") or delta.get("text") or ""
            reasoning += delta.get("reasoning_content") or ""
            finish = ch.get("finish_reason") or finish
        if hang_up_after is not None and events >= hang_up_after:
            return {"hung_up": True}
    return {"streamed": True, "content": content, "reasoning": reasoning, "finish_reason": finish, "usage": usage,
            "chunks": events, "error": error}


def answer_of(out: dict) -> dict:
    """The parts of an answer that must match the reference exactly."""
    if out.get("streamed"):
        usage = out["usage"] or {}
        return {"content": out["content"], "reasoning": out["reasoning"], "finish_reason": out["finish_reason"],
                "completion_tokens": usage.get("completion_tokens"), "prompt_tokens": usage.get("prompt_tokens")}
    ch = out["choices"][0]
    msg = ch.get("message", {})
    return {"content": msg.get("content", ch.get("text")), "reasoning": msg.get("reasoning_content") or "",
            "finish_reason": ch["finish_reason"], "completion_tokens": out["usage"]["completion_tokens"],
            "prompt_tokens": out["usage"]["prompt_tokens"]}


def body_of(req: dict) -> bytes:
    body = dict(req)
    if body.get("stream"):
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


# -- the server process --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_diffgemma.server", "--model", str(model), "--port", str(self.port), *args],
            stdout=self.log, stderr=self.log)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not come up in 300 s")

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# -- phases --------------------------------------------------------------------------------------


def load_phase(server: ServerProcess, clients: int, total: int, reqs, expected, bad, rng) -> dict:
    """`total` requests from `clients` threads: ~10% malformed, ~3% hang-ups, the rest checked."""
    work = []
    for i in range(total):
        roll = rng.random()
        if roll < 0.10:
            work.append(("bad", rng.randrange(len(bad))))
        elif roll < 0.13:
            work.append(("hangup", rng.choice([k for k, (_, b) in enumerate(reqs) if b.get("stream")])))
        else:
            work.append(("ok", rng.randrange(len(reqs))))
    lock = threading.Lock()
    latencies, problems, counts = [], [], {"ok": 0, "bad": 0, "hangup": 0, "rejected_429": 0, "tokens": 0}
    it = iter(enumerate(work))

    def client():
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            n, (kind, k) = item
            try:
                if kind == "bad":
                    path, body, headers, want = bad[k]
                    status, out, dt = post(server.port, path, body, headers)
                    err = (out or {}).get("error", {})
                    good = status == want and isinstance(err.get("message"), str) and "type" in err
                    with lock:
                        counts["bad"] += 1
                        if not good:
                            problems.append(f"#{n} malformed {k}: got {status} {str(out)[:120]}, want {want}")
                elif kind == "hangup":
                    path, req = reqs[k]
                    status, out, dt = post(server.port, path, body_of(req), hang_up_after=1)
                    with lock:
                        counts["hangup"] += 1
                else:
                    path, req = reqs[k]
                    status, out, dt = post(server.port, path, body_of(req))
                    with lock:
                        if status == 429:
                            counts["rejected_429"] += 1
                            continue
                        if status != 200:
                            problems.append(f"#{n} request {k}: status {status} {str(out)[:200]}")
                            continue
                        got = answer_of(out)
                        if got != expected[k]:
                            problems.append(f"#{n} request {k}: answer differs from the run alone: "
                                            f"{got} != {expected[k]}")
                        counts["ok"] += 1
                        counts["tokens"] += got["completion_tokens"] or 0
                        latencies.append(dt)
            except Exception as e:  # a lost response: connection error, timeout, bad JSON
                with lock:
                    problems.append(f"#{n} {kind} {k}: {type(e).__name__}: {e}")

    rss_start = server.rss()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    alive = server.proc.poll() is None
    lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa: E731
    return {
        "clients": clients, "requests": total, **counts, "problems": problems[:20], "problem_count": len(problems),
        "server_alive": alive, "wall_s": round(wall, 2),
        "throughput_req_s": round(counts["ok"] / wall, 2), "throughput_tokens_s": round(counts["tokens"] / wall, 1),
        "latency_p50_s": round(pct(0.50), 3) if lat else None, "latency_p99_s": round(pct(0.99), 3) if lat else None,
        "latency_mean_s": round(statistics.mean(lat), 3) if lat else None,
        "rss_start_bytes": rss_start, "rss_end_bytes": server.rss() if alive else None,
    }


def soak_phase(server: ServerProcess, n: int, reqs, expected) -> dict:
    samples, problems, t0 = [], [], time.perf_counter()
    for i in range(n):
        k = i % len(reqs)
        path, req = reqs[k]
        status, out, _ = post(server.port, path, body_of(req))
        if status != 200 or answer_of(out) != expected[k]:
            problems.append(f"soak #{i} request {k}: status {status}")
        if i % 25 == 0 or i == n - 1:
            samples.append((i + 1, server.rss()))
    tail = [r for _, r in samples[len(samples) // 2:]]
    return {"requests": n, "problem_count": len(problems), "problems": problems[:10],
            "wall_s": round(time.perf_counter() - t0, 1), "rss_samples": samples,
            "rss_first_bytes": samples[0][1], "rss_last_bytes": samples[-1][1],
            "rss_second_half_spread_bytes": max(tail) - min(tail), "server_alive": server.proc.poll() is None}


def markdown(res: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}" if b else "-"  # noqa: E731
    m = res["machine"]
    lines = [
        "# Server load benchmark", "",
        f"`{res['command']}` — {res['date']}", "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), {m['platform']}, Python {m['python']}, "
        f"mlx {m['versions'].get('mlx', '?')}. {m.get('shared_note') or ''}", "",
        f"Model: tiny random checkpoint (canvas {res['canvas_length']}), {KNOBS['max_denoising_steps']} denoising "
        f"steps per canvas; {res['distinct']} distinct requests, expected answers from a separate server with "
        "the prefix cache off, each request run alone.", "",
        "| clients | requests | ok | malformed (4xx ok) | hang-ups | 429 | problems | server alive | req/s | tok/s "
        "| p50 s | p99 s | RSS start MiB | RSS end MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in res["load"]:
        lines.append(
            f"| {p['clients']} | {p['requests']} | {p['ok']} | {p['bad']} | {p['hangup']} | {p['rejected_429']} "
            f"| {p['problem_count']} | {p['server_alive']} | {p['throughput_req_s']} | {p['throughput_tokens_s']} "
            f"| {p['latency_p50_s']} | {p['latency_p99_s']} | {mib(p['rss_start_bytes'])} "
            f"| {mib(p['rss_end_bytes'])} |")
    s = res["soak"]
    lines += [
        "", f"Soak: {s['requests']} sequential requests in {s['wall_s']} s, {s['problem_count']} problems, "
        f"server alive {s['server_alive']}. RSS {mib(s['rss_first_bytes'])} MiB after the first request, "
        f"{mib(s['rss_last_bytes'])} MiB after the last; spread over the second half "
        f"{s['rss_second_half_spread_bytes'] / 2**20:.2f} MiB.", "",
        "RSS samples (requests done: MiB): " + ", ".join(f"{i}: {mib(r)}" for i, r in s["rss_samples"]), "",
        f"Server health at the end: {json.dumps(res['health_end'])}", "",
        f"Server exit code on SIGTERM: load {res['exit_codes']['load']}, reference {res['exit_codes']['reference']}.",
    ]
    problems = [x for p in res["load"] for x in p["problems"]] + s["problems"]
    if problems:
        lines += ["", "First problems:", *[f"- {x}" for x in problems[:20]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: build a tiny random one)")
    ap.add_argument("--requests", type=int, default=240, help="requests per concurrency level")
    ap.add_argument("--soak", type=int, default=300, help="sequential requests in the soak")
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default="server_load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for the load server, e.g. --server-arg=--loop=stream")
    args = ap.parse_args(argv)
    from benchmarks.machine import record

    tmp = tempfile.TemporaryDirectory(prefix="server-load-")
    model = args.model
    if model is None:
        from mlx_diffgemma.testing import build_checkpoint

        model, _ = build_checkpoint(Path(tmp.name) / "tiny", canvas_length=32, seed=0)
    canvas = json.loads((Path(model) / "config.json").read_text()).get("canvas_length")
    reqs, bad, rng = distinct_requests(), malformed_requests(), random.Random(args.seed)
    result = {"command": " ".join(["python -m benchmarks.server_load", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": record(shared=True),
              "canvas_length": canvas, "distinct": len(reqs)}

    print(f"reference answers: {len(reqs)} requests, each alone ...", flush=True)
    ref = ServerProcess(model, "--prefix-cache", "0", "--api-key", API_KEY)
    expected = []
    for path, req in reqs:
        status, out, _ = post(ref.port, path, body_of(req))
        if status != 200:
            raise SystemExit(f"reference request failed: {status} {out}")
        expected.append(answer_of(out))
    result["exit_codes"] = {"reference": ref.stop()}

    server = ServerProcess(model, "--api-key", API_KEY, "--max-queue", "64", "--max-body-bytes", str(256 << 10),
                           *args.server_arg)
    result["rss_after_start_bytes"] = server.rss()
    result["load"] = []
    try:
        for clients in [int(c) for c in args.clients.split(",")]:
            print(f"load: {clients} clients, {args.requests} requests ...", flush=True)
            phase = load_phase(server, clients, args.requests, reqs, expected, bad, rng)
            print(f"  {phase['ok']} ok, {phase['problem_count']} problems, p50 {phase['latency_p50_s']} s, "
                  f"p99 {phase['latency_p99_s']} s, {phase['throughput_req_s']} req/s", flush=True)
            result["load"].append(phase)
        print(f"soak: {args.soak} sequential requests ...", flush=True)
        result["soak"] = soak_phase(server, args.soak, reqs, expected)
        result["health_end"] = server.health()
    finally:
        result["exit_codes"]["load"] = server.stop()
    if result["exit_codes"]["load"] != 0:
        print(server.output(), file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", markdown(result))):
        write_text_atomic(args.out / f"{args.name}{suffix}", text)
    print(markdown(result))
    problems = sum(p["problem_count"] for p in result["load"]) + result["soak"]["problem_count"]
    crashed = not all(p["server_alive"] for p in result["load"]) or result["exit_codes"]["load"] != 0
    return 1 if problems or crashed else 0


if __name__ == "__main__":
    sys.exit(main())
