"""Serving throughput: concurrent clients with different steer values vs the same requests one at a time.

A bounded load run against a local server (loopback only):

1. **Sequential**: N requests, one at a time (each a batch of one).
2. **8 and 32 concurrent clients**: the same kind of requests (every one with its own random steer
   values), each client sending its next request when the previous one is answered.
3. **Steered vs unsteered**: the 8-client run again with no steers at all (the server then runs
   the plain model): throughput ratio unsteered / steered.

Every run is repeated ``--reps`` times and medians are reported, with p50/p95 latency, failed
requests, and the server's RSS after warm-up and at the end. The server runs as a separate
process (``python -m steerport.serve``) so clients and server do not share an interpreter.

Results: ``benchmarks/results/bench_serve.{json,md}``.

Usage::

    python benchmarks/bench_serve.py                       # smollm2-135m, 16 tokens per request
    python benchmarks/bench_serve.py --quick               # fewer requests, one repetition
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import httpx  # noqa: E402
import psutil  # noqa: E402

STEERS = {"positive": ROOT / "benchmarks/steers/smollm2-135m-sst2-positive.st",
          "detox": ROOT / "benchmarks/steers/smollm2-135m-paradetox-nontoxic.st"}


def machine() -> dict:
    from steerport.models import cpu_name

    info = {"platform": platform.platform(), "python": platform.python_version(), "logical_cpus": os.cpu_count(),
            "Model name": cpu_name()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("CPU(s)", "Thread(s) per core", "Core(s) per socket", "Flags"):
                info[key.strip()] = value.strip() if key.strip() != "Flags" else (
                    "avx512_bf16" in value or "amx_bf16" in value)
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    info["torch"] = torch.__version__
    info["torch_threads_default"] = torch.get_num_threads()
    return info


def prompts() -> list[str]:
    path = ROOT / "steerport/data/prompts/sentiment_neutral_50.jsonl"
    return [json.loads(line)["prompt"]["text"] for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int, window_ms: float, threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "steerport.serve", model, "--port", str(port), "--no-curve", "--no-keywords",
           "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms), "--log-level", "warning",
           "--max-concurrent", "128"]
    if threads:
        cmd += ["--threads", str(threads)]
    for name, path in STEERS.items():
        cmd += ["--steer", f"{name}={path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not come up")


def make_requests(n: int, steered: bool, seed: int, max_tokens: int) -> list[dict]:
    rng = random.Random(seed)
    ps = prompts()
    out = []
    for i in range(n):
        body = {"model": "smollm2-135m", "prompt": ps[i % len(ps)], "max_tokens": max_tokens, "temperature": 0}
        if steered:  # every request its own values (none repeats), often both steers at once
            body["steers"] = {"positive": round(rng.uniform(-4, 4), 2), "detox": round(rng.uniform(-3, 3), 2)}
            if rng.random() < 0.3:
                del body["steers"]["detox"]
        out.append(body)
    return out


async def run_load(url: str, requests: list[dict], clients: int, time_limit: float) -> dict:
    """``clients`` workers take requests from a shared list; returns throughput and latencies."""
    queue = list(reversed(requests))
    latencies, tokens, failures = [], 0, 0
    deadline = time.monotonic() + time_limit

    async def worker(client: httpx.AsyncClient):
        nonlocal tokens, failures
        while queue and time.monotonic() < deadline:
            body = queue.pop()
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/v1/completions", json=body)
                ok = r.status_code == 200
                if ok:
                    tokens += r.json()["usage"]["completion_tokens"]
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            failures += 0 if ok else 1

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "clients": clients, "requests": len(lat), "failed": failures, "wall_s": wall,
        "completion_tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(lat) / wall,
        "latency_p50_s": lat[len(lat) // 2] if lat else None,
        "latency_p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else None,
        "unfinished": len(queue),
    }


def median_of(runs: list[dict]) -> dict:
    keys = ("wall_s", "tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p95_s")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out.update(clients=runs[0]["clients"], requests=runs[0]["requests"], failed=sum(r["failed"] for r in runs),
               unfinished=sum(r["unfinished"] for r in runs), reps=len(runs))
    return out


def step_overhead(model: str, batch: int = 8, reps: int = 40, threads: int | None = None) -> dict:
    """In-process A/B/C of one decode step: batch ``batch`` plain, the same with per-row steer hooks,
    and batch 1 plain, interleaved so that the ratios are robust to the machine's load drifting.

    steered/plain is the hooks' cost; batch / (step_b / step_1) bounds what batching can gain.
    """
    import torch

    import steerport
    from steerport.serve.rows import apply_rows

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    lm = steerport.load_model(model)
    steers = [steerport.Steer.load(p) for p in STEERS.values()]
    rng = random.Random(0)
    tok = lm.tokenizer
    tok.padding_side = "left"

    def prepared(ps: list[str]):
        enc = tok(ps, return_tensors="pt", padding=True)
        mask = enc["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = lm.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones(len(ps), 1, dtype=mask.dtype)], 1)
        return {"input_ids": nxt, "attention_mask": step_mask, "position_ids": pos[:, -1:] + 1, "cache": cache}

    times: dict[str, list[float]] = {"plain": [], "steered": [], "batch1": []}
    with torch.no_grad():
        big, one = prepared(prompts()[:batch]), prepared(prompts()[:1])
        values = torch.tensor([[rng.uniform(-4, 4), rng.uniform(-3, 3)] for _ in range(batch)])
        for i in range(3 * (reps + 2)):
            kind = ("plain", "steered", "batch1")[i % 3]
            kw = one if kind == "batch1" else big
            remove = apply_rows(lm, steers, values) if kind == "steered" else (lambda: None)
            t0 = time.perf_counter()
            lm.model(**kw, use_cache=True, logits_to_keep=1)
            dt = time.perf_counter() - t0
            remove()
            kw["cache"].crop(-1)  # back to the prefilled cache: every step does the same work
            if i >= 6:  # the first two of each kind warm up
                times[kind].append(dt)
    torch.set_num_threads(old_threads)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "reps": reps, "threads": threads or old_threads, "median_step_s": med,
            "steered_over_plain": med["steered"] / med["plain"],
            "batching_bound": batch * med["batch1"] / med["plain"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seq-requests", type=int, default=24, help="requests in the sequential run")
    ap.add_argument("--requests-8", type=int, default=48)
    ap.add_argument("--requests-32", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--window-ms", type=float, default=15.0)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per load run (bounded)")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--step-only", action="store_true",
                    help="only the in-process step A/B; adds it to an existing results json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_serve")
    args = ap.parse_args()
    if args.quick:
        args.seq_requests, args.requests_8, args.requests_32, args.reps = 8, 16, 32, 1

    if args.step_only:
        res = json.loads(args.out.with_suffix(".json").read_text())
        res["step_overhead"] = step_overhead(args.model, threads=args.threads)
        res["step_overhead"]["load_average"] = os.getloadavg()
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(report(res) + "\n")
        print(report(res))
        return
    info = machine()
    info["load_average_start"] = os.getloadavg()
    port = free_port()
    t_start = time.time()
    proc = start_server(args.model, port, args.max_batch, args.window_ms, args.threads)
    url = f"http://127.0.0.1:{port}"
    server = psutil.Process(proc.pid)
    results: dict = {"settings": vars(args) | {"out": str(args.out)}, "machine": info}
    try:
        # warm-up: every batch size the runs will use, steered and not
        for clients in (1, 8, 32):
            asyncio.run(run_load(url, make_requests(clients, True, 999, args.max_tokens), clients, args.time_limit))
        asyncio.run(run_load(url, make_requests(8, False, 999, args.max_tokens), 8, args.time_limit))
        time.sleep(1.0)  # the engine releases freed memory once idle
        rss_warm = server.memory_info().rss
        rss_reps = []
        runs: dict[str, list[dict]] = {"sequential": [], "clients_8": [], "clients_32": [], "clients_8_unsteered": []}
        for rep in range(args.reps):
            seed = 100 + rep
            runs["sequential"].append(asyncio.run(run_load(
                url, make_requests(args.seq_requests, True, seed, args.max_tokens), 1, args.time_limit)))
            runs["clients_8"].append(asyncio.run(run_load(
                url, make_requests(args.requests_8, True, seed, args.max_tokens), 8, args.time_limit)))
            runs["clients_8_unsteered"].append(asyncio.run(run_load(
                url, make_requests(args.requests_8, False, seed, args.max_tokens), 8, args.time_limit)))
            runs["clients_32"].append(asyncio.run(run_load(
                url, make_requests(args.requests_32, True, seed, args.max_tokens), 32, args.time_limit)))
            time.sleep(1.0)
            rss_reps.append(server.memory_info().rss / 2**20)
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{k} {v[-1]['tokens_per_s']:.1f} tok/s" for k, v in runs.items()), flush=True)
        rss_end = server.memory_info().rss  # measured after the last repetition's pause
        stats = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    med = {k: median_of(v) for k, v in runs.items()}
    seq = med["sequential"]["tokens_per_s"]
    results.update(
        runs=runs, medians=med, server_stats=stats,
        ratios={
            "paired_median_8_vs_sequential": statistics.median(
                a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["clients_8"], runs["sequential"])),
            "paired_median_32_vs_sequential": statistics.median(
                a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["clients_32"], runs["sequential"])),
            "paired_median_unsteered_vs_steered_8": statistics.median(
                a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["clients_8_unsteered"], runs["clients_8"])),
            "throughput_8_vs_sequential": med["clients_8"]["tokens_per_s"] / seq,
            "throughput_32_vs_sequential": med["clients_32"]["tokens_per_s"] / seq,
            "unsteered_vs_steered_8": med["clients_8_unsteered"]["tokens_per_s"] / med["clients_8"]["tokens_per_s"],
            "per_rep_8_vs_sequential": [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["clients_8"], runs["sequential"])],
            "per_rep_unsteered_vs_steered_8": [a["tokens_per_s"] / b["tokens_per_s"]
                                               for a, b in zip(runs["clients_8_unsteered"], runs["clients_8"])],
        },
        memory={"rss_after_warmup_mib": rss_warm / 2**20, "rss_end_mib": rss_end / 2**20, "rss_after_each_rep_mib": rss_reps,
                "growth_mib": (rss_end - rss_warm) / 2**20},
        failed_total=sum(r["failed"] for v in runs.values() for r in v),
        total_s=time.time() - t_start,
    )
    info["load_average_end"] = os.getloadavg()
    results["step_overhead"] = step_overhead(args.model, threads=args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(results) + "\n")
    print(report(results))


def report(res: dict) -> str:
    m, r, mem, s = res["medians"], res["ratios"], res["memory"], res["settings"]
    info = res["machine"]
    rows = "\n".join(
        f"| {name} | {v['clients']} | {v['requests']} | {v['tokens_per_s']:.1f} | {v['requests_per_s']:.2f} | "
        f"{v['latency_p50_s']:.2f} | {v['latency_p95_s']:.2f} | {v['failed']} |"
        for name, v in m.items())
    per8 = ", ".join(f"{x:.2f}" for x in r["per_rep_8_vs_sequential"])
    perU = ", ".join(f"{x:.3f}" for x in r["per_rep_unsteered_vs_steered_8"])
    return f"""# bench_serve: batched serving with per-request steers

Model `{s['model']}` (float32), {s['max_tokens']} new tokens per request, greedy; steers `positive` and `detox`
(every steered request with its own random values, positive in [-4, 4], detox in [-3, 3]); server
`python -m steerport.serve` in its own process on loopback, max batch {s['max_batch']}, batching window
{s['window_ms']:g} ms. Medians of {s['reps']} repetitions. Machine: {info.get('Model name', '?')}, {info.get('CPU(s)', '?')} logical CPUs
({info.get('Core(s) per socket', '?')} cores per socket, {info.get('Thread(s) per core', '?')} threads per core), torch {info['torch']} with
{s['threads'] or info['torch_threads_default']} threads in the server; load average at start
{', '.join(f'{x:.1f}' for x in info['load_average_start'])}, at end
{', '.join(f'{x:.1f}' for x in info['load_average_end'])} (a shared machine: other jobs ran at the same time).

| run | clients | requests | completion tokens/s | requests/s | p50 latency (s) | p95 latency (s) | failed |
|---|---|---|---|---|---|---|---|
{rows}

Ratios are taken within each repetition (its runs are adjacent in time, so they share the machine's load),
then the median over repetitions; the ratio of the medians in the table is given too.

- Throughput, 8 concurrent clients vs the same kind of requests one at a time: **{r['paired_median_8_vs_sequential']:.2f}×**
  (per repetition: {per8}; ratio of medians {r['throughput_8_vs_sequential']:.2f}×; target ≥ 3×).
  32 clients: **{r['paired_median_32_vs_sequential']:.2f}×** (ratio of medians {r['throughput_32_vs_sequential']:.2f}×).
- Unsteered / steered server throughput at 8 clients: **{r['paired_median_unsteered_vs_steered_8']:.3f}×** (per repetition: {perU};
  ratio of medians {r['unsteered_vs_steered_8']:.3f}×; target ≤ 1.05×).
- Failed requests: **{res['failed_total']}**.
- Server RSS after warm-up {mem['rss_after_warmup_mib']:.0f} MiB, at the end {mem['rss_end_mib']:.0f} MiB
  (growth {mem['growth_mib']:+.1f} MiB; after each repetition: {', '.join(f'{x:.0f}' for x in mem.get('rss_after_each_rep_mib', []))} MiB;
  each read 1 s after the load stops).
- Engine counters at the end: {res['server_stats']['batches']} batches, {res['server_stats']['rows']} rows,
  largest batch {res['server_stats']['max_rows_in_batch']} rows.
- Whole run: {res['total_s']:.0f} s.
""" + _step_lines(res)


def _step_lines(res: dict) -> str:
    st = res.get("step_overhead")
    if not st:
        return ""
    m = st["median_step_s"]
    return (f"- In-process ({st.get('threads', '?')} threads), one decode step interleaved {st['reps']} times each "
            f"(medians): batch {st['batch']} plain "
            f"{m['plain'] * 1000:.1f} ms, batch {st['batch']} with per-row values for both steers "
            f"{m['steered'] * 1000:.1f} ms (ratio **{st['steered_over_plain']:.3f}×**), batch 1 {m['batch1'] * 1000:.1f} ms; "
            f"so on this machine at this load batching {st['batch']} rows can gain at most "
            f"{st['batching_bound']:.2f}× per step ({st['batch']} × batch-1 step / batch-{st['batch']} step).\n")


if __name__ == "__main__":
    main()
