"""`make bench`: start-up and patch speed, as ratios against baselines measured in the same run.

Targets (exit 1 when one is missed):
* `launch --help`, `launch presets` and `launch plan PRESET --json` each under 0.5 s and at least
  10x faster than `lmdeploy serve api_server --help` (which imports torch);
* patching a model directory whose weights total 10 GB takes the same time as one of 10 MB
  (nothing is copied): ratio of medians under 1.5;
* `launch fetch` of a repo (BENCH_FETCH_MB of random weights in two shards, default 300) from the
  tests' hub on 127.0.0.1 (tests/support/fakehub.py) takes at most 1.05x the time of huggingface_hub's own
  `hf download` of the same files into an empty cache: whole-process medians, runs alternated;
* routers in front of 3 stand-in replicas under a fault schedule (bench/faults.py: the busiest replica
  SIGKILLed at 1/3 of the requests, the busiest one left SIGSTOPped at 2/3), side by side: failed requests
  (plain and streaming), the requests in flight on the failed replicas, latency added over a direct call,
  peak RSS, start time. Target: the router `launch proxy start` runs by default fails no more requests than
  were in flight on the failed replicas. BENCH_FAULT_REQUESTS (600), BENCH_FAULT_STREAM_REQUESTS (300),
  BENCH_FAULT_ROUTERS (a,b,...: default all of them) change the run.

Writes bench-results/bench.json. Timings are medians of several runs of real subprocesses.
`python bench/run.py fetch` runs the fetch comparison alone (bench-results/bench-fetch.json),
`python bench/run.py startup` the start-up timings alone (bench-results/bench-startup.json), with the
time `launch plan` spends importing msgspec (the presets' schema), `python bench/run.py faults [ARGS]` the
fault bench alone (bench-results/bench-faults.json; ARGS as bench/faults.py takes them, e.g. --requests 1500).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RUNS = int(os.environ.get("BENCH_RUNS", "7"))
BASELINE_RUNS = int(os.environ.get("BENCH_BASELINE_RUNS", "3"))
FETCH_RUNS = int(os.environ.get("BENCH_FETCH_RUNS", "5"))
FETCH_MB = int(os.environ.get("BENCH_FETCH_MB", "300"))


def timed(argv: list[str], runs: int, env: dict | None = None, setup=None) -> list[float]:
    times = []
    for i in range(runs):
        if setup:
            setup(i)
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"bench: {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return times


def make_model(directory: Path, total_bytes: int, shards: int) -> Path:
    """A model directory whose safetensors shards are sparse files of the given total size."""
    directory.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rope_scaling": None, "num_hidden_layers": 32, "hidden_size": 4096,
        "num_attention_heads": 32, "torch_dtype": "float16",
    }
    (directory / "config.json").write_text(json.dumps(config))
    for i in range(shards):
        with open(directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            f.truncate(total_bytes // shards)
    (directory / "tokenizer.json").write_text("{}")
    return directory


def bench_fetch(env: dict) -> dict:
    """`launch fetch` vs `hf download` of the same files from a loopback hub, each into a fresh cache."""
    sys.path.insert(0, str(ROOT))
    from tests.support.fakehub import FakeHub, tiny_repo_files

    half = FETCH_MB * 1000**2 // 2
    shards = {f"model-0000{i}-of-00002.safetensors": os.urandom(half) for i in (1, 2)}
    index = {"metadata": {"total_size": 2 * half}, "weight_map": {f"w{i}": name for i, name in enumerate(shards)}}
    files = {name: data for name, data in tiny_repo_files().items() if not name.startswith("model")}
    files.update(shards, **{"model.safetensors.index.json": json.dumps(index).encode()})
    work = Path(tempfile.mkdtemp(prefix="launch-bench-fetch-"))
    times: dict[str, list[float]] = {"launch": [], "hf": []}
    try:
        with FakeHub() as hub:
            hub.add_repo("org/bench", files)
            run_env = dict(env, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
                           HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
                           no_proxy="127.0.0.1,localhost", HF_HOME=str(work / "hf"))
            wanted = [line for line in subprocess.run(
                [sys.executable, "-m", "launcher", "fetch", "org/bench", "-q"], env=run_env, capture_output=True,
                text=True, check=True).stdout.splitlines()][-1:]
            served = sorted(p.name for p in Path(wanted[0]).iterdir())  # launch's selection: hf gets the same
            commands = {"launch": [sys.executable, "-m", "launcher", "fetch", "org/bench", "-q"],
                        "hf": [str(VENV_BIN / "hf"), "download", "org/bench", *served, "--quiet"]}

            def fresh(_i):
                shutil.rmtree(work / "hf", ignore_errors=True)

            for i in range(FETCH_RUNS):
                for name in (("launch", "hf") if i % 2 == 0 else ("hf", "launch")):
                    times[name] += timed(commands[name], 1, run_env, fresh)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    launch_s, hf_s = statistics.median(times["launch"]), statistics.median(times["hf"])
    ratio = launch_s / hf_s
    return {"megabytes": FETCH_MB, "files": len(served), "runs": FETCH_RUNS, "launch_median_s": launch_s,
            "hf_download_median_s": hf_s, "ratio": ratio, "pass": ratio <= 1.05}


def fetch_line(fetched: dict) -> str:
    label = f"launch fetch vs hf download, {FETCH_MB} MB"
    return (f"{label:<42} {fetched['launch_median_s']:.3f} s vs "
            f"{fetched['hf_download_median_s']:.3f} s   ratio {fetched['ratio']:.3f}   "
            f"{'PASS' if fetched['pass'] else 'FAIL'}  (target <= 1.05, {FETCH_RUNS} runs each, same files)")


def write(name: str, results: dict) -> None:
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / name).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out / name}")


STARTUP = (
    ("launch --help", ["--help"]),
    ("launch presets", ["presets"]),
    ("launch plan internlm2_5-7b-chat --json", ["plan", "internlm2_5-7b-chat", "--json"]),
)


def import_seconds(module: str, argv: list[str], env: dict, runs: int) -> float:
    """Median seconds a run of ``argv`` spends importing ``module`` (with what it imports first), by
    Python's own ``-X importtime``."""
    times = []
    for _ in range(runs):
        result = subprocess.run([sys.executable, "-X", "importtime", *argv[1:]], capture_output=True, text=True,
                                env=env, check=False)
        times += [int(line.split("|")[1]) / 1e6 for line in result.stderr.splitlines()
                  if line.startswith("import time:") and line.split("|")[-1].strip() == module]
    return statistics.median(times) if times else 0.0


def bench_startup(launch: list[str], env: dict, results: dict) -> tuple[float, list, bool]:
    """--help, presets and plan against `lmdeploy serve api_server --help`, and what the presets'
    schema library (msgspec) adds to plan's start-up."""
    lmdeploy = VENV_BIN / "lmdeploy"
    baseline = statistics.median(timed([str(lmdeploy), "serve", "api_server", "--help"], BASELINE_RUNS, env))
    results["baseline_lmdeploy_help_s"] = baseline
    ok, rows = True, []
    for label, args in STARTUP:
        median = statistics.median(timed(launch + args, RUNS, env))
        ratio = baseline / median
        passed = median < 0.5 and ratio >= 10
        ok &= passed
        rows.append((label, median, ratio, passed))
        results[label] = {"median_s": median, "speedup_vs_lmdeploy_help": ratio, "pass": passed}
    results["msgspec_import_in_plan_s"] = import_seconds("msgspec", launch + STARTUP[2][1], env, RUNS)
    return baseline, rows, ok


def print_startup(baseline: float, rows: list, msgspec_s: float) -> None:
    print(f"baseline: lmdeploy serve api_server --help  median {baseline:.3f} s ({BASELINE_RUNS} runs)")
    for label, median, ratio, passed in rows:
        print(f"{label:<42} median {median:.3f} s   {ratio:5.1f}x faster   {'PASS' if passed else 'FAIL'}"
              "  (target < 0.5 s and >= 10x)")
    print(f"{'  of which msgspec import (presets schema)':<42} median {msgspec_s:.3f} s   (python -X importtime)")


def bench_faults(args: list[str]) -> tuple[dict, str, bool]:
    """bench/faults.py with ``args`` (else the BENCH_FAULT_* variables): its results, its table, and whether
    launch's default router met the target (True when that router was not in the run)."""
    import faults

    if not args:
        for flag, var in (("--requests", "BENCH_FAULT_REQUESTS"), ("--stream-requests", "BENCH_FAULT_STREAM_REQUESTS"),
                          ("--routers", "BENCH_FAULT_ROUTERS")):
            if os.environ.get(var):
                args += [flag, os.environ[var]]
    settings = faults.parse_args(args)
    results = faults.run(settings)
    default = "launch-default" if faults.launch_has_router_flag() else "lmdeploy"
    rows = [r for r in results["routers"] if r["router"] == default]
    passed = all(r["plain"]["goal_met"] and r["stream"]["goal_met"] for r in rows)
    results["target"] = {"router": default, "measured": bool(rows), "pass": passed}
    line = (f"target: `launch proxy start`'s default router ({default}) fails no more requests than were in flight "
            f"on the failed replicas: {'PASS' if passed else 'FAIL'}" if rows else
            f"target: `launch proxy start`'s default router ({default}) not in this run")
    return results, faults.table(results) + "\n" + line, passed


def main(argv: list[str]) -> int:
    # Measure launch as installed (byte-compiled), not a first run that compiles its sources.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "launcher")], check=True)
    launch = [sys.executable, "-m", "launcher"]
    env = dict(os.environ, LAUNCH_PRESETS_DIR=str(Path(tempfile.mkdtemp()) / "none"))
    if argv[:1] == ["faults"]:
        faulted, text, passed = bench_faults(argv[1:])
        print(text)
        write("bench-faults.json", {"python": sys.version.split()[0], "faults": faulted})
        return 0 if passed else 1
    if argv == ["fetch"]:
        fetched = bench_fetch(env)
        print(fetch_line(fetched))
        write("bench-fetch.json", {"python": sys.version.split()[0], "fetch": fetched})
        return 0 if fetched["pass"] else 1
    results: dict = {"runs": RUNS, "python": sys.version.split()[0]}
    baseline, rows, ok = bench_startup(launch, env, results)
    if argv == ["startup"]:
        print_startup(baseline, rows, results["msgspec_import_in_plan_s"])
        write("bench-startup.json", results)
        return 0 if ok else 1

    work = Path(tempfile.mkdtemp(prefix="launch-bench-"))
    try:
        small = make_model(work / "small", 10 * 1000**2, 4)
        big = make_model(work / "big", 10 * 1000**3, 4)
        patch_env = dict(env, LAUNCH_CACHE_DIR=str(work / "cache"))

        def fresh(_i):
            shutil.rmtree(work / "cache", ignore_errors=True)

        t_small = statistics.median(timed(launch + ["patch", str(small), "--factor", "2"], RUNS, patch_env, fresh))
        t_big = statistics.median(timed(launch + ["patch", str(big), "--factor", "2"], RUNS, patch_env, fresh))
        overlay_bytes = sum(
            os.lstat(os.path.join(root, name)).st_size
            for root, _dirs, names in os.walk(work / "cache") for name in names
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    patch_ratio = t_big / t_small
    patch_pass = patch_ratio < 1.5 and overlay_bytes < 1_000_000
    ok &= patch_pass
    results["patch"] = {"10MB_median_s": t_small, "10GB_median_s": t_big, "ratio_10GB_over_10MB": patch_ratio,
                        "overlay_bytes_on_disk": overlay_bytes, "pass": patch_pass}

    fetched = bench_fetch(env)
    ok &= fetched["pass"]
    results["fetch"] = fetched

    faulted, faults_text, faults_pass = bench_faults([])
    ok &= faults_pass
    results["faults"] = faulted

    print_startup(baseline, rows, results["msgspec_import_in_plan_s"])
    print(f"{'launch patch, 10 GB of weights vs 10 MB':<42} {t_big:.3f} s vs {t_small:.3f} s   ratio {patch_ratio:.2f}"
          f"   overlay {overlay_bytes:,} B   {'PASS' if patch_pass else 'FAIL'}  (target ratio < 1.5, nothing copied)")
    print(fetch_line(fetched))
    print(faults_text)
    write("bench.json", results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
