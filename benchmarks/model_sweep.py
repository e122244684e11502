"""``reparam.fuse`` on real third-party models: exact, never broken, never costlier, no BN left without a reason.

Runs in the shared third-party venv (timm, torchvision, ultralytics), importing ``reparam`` from PYTHONPATH:

    cd /work/wt-sweep && PYTHONPATH=$PWD nice -n 10 /tmp/reparam-thirdparty/bin/python benchmarks/model_sweep.py
    ... benchmarks/model_sweep.py --quick --out /tmp/sweep-quick.json        # 9 models, about 3 minutes
    ... benchmarks/model_sweep.py --models 'timm:repvgg*,timm:mobileone*'     # a subset, merged into --out
    ... benchmarks/model_sweep.py --resume                                   # finish an interrupted run

The model list is computed from the registries (see ``_sweep_models``: the BN member with the fewest parameters
of every family); ``--list`` prints it.  Each model is measured in a worker process (one at a time, recycled
every ``--recycle`` models) with a wall-clock limit and a memory limit, so a hang or a crash costs one record,
not the sweep.  The result file is rewritten after every model; a later run merges into it (``--fresh``
starts over, ``--resume`` skips the models already recorded).  At the end the totals are recomputed over all
records, and ``model_sweep.png`` is drawn beside the JSON.  ``benchmarks/summarize_sweep.py`` turns the JSON
into ``docs/model_sweep.md``.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C
import _sweep_models as M
import summarize_sweep as S

DEFAULT_JSON = C.DEFAULT_OUT / "model_sweep.json"
CANDIDATES = C.DEFAULT_OUT / "model_sweep_candidates.json"
#: Environment for model code that would otherwise write settings to $HOME or print banners.
STARTUP_S = 300  # a fresh worker imports torch and the model libraries before it starts a model
QUIET_ENV = {"YOLO_CONFIG_DIR": "/tmp/reparam-sweep-ultralytics", "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_JSON, help=f"result JSON (default {DEFAULT_JSON})")
    p.add_argument("--models", help="comma-separated glob patterns on id, name or family (e.g. 'timm:repvgg*')")
    p.add_argument("--quick", action="store_true", help=f"{len(M.QUICK)} models, 1 timing round (smoke test)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds per model (default 3; --quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds per model before its worker is killed")
    p.add_argument("--memory-gib", type=float, default=10, help="worker resident memory limit")
    p.add_argument("--recycle", type=int, default=20, help="models per worker process before a fresh one")
    p.add_argument("--resume", action="store_true", help="skip models already recorded in --out")
    p.add_argument("--fresh", action="store_true", help="discard the records already in --out")
    p.add_argument("--refresh-list", action="store_true", help="rescan the registries (else cached per version)")
    p.add_argument("--list", action="store_true", help="print the selected models and exit")
    p.add_argument("--in-process", action="store_true", help="no worker process (debugging; no time limit)")
    args = p.parse_args(argv)
    os.environ.update({k: v for k, v in QUIET_ENV.items() if k not in os.environ})

    specs = M.select(M.scanned_rows(CANDIDATES, args.refresh_list, log=C.log))
    specs = choose(specs, args.models, args.quick)
    if args.list:
        for s in specs:
            print(f"{s.id:<48} {s.family:<40} {s.params:>12,}")
        print(f"{len(specs)} models")
        return 0
    if not specs:
        print("no model matches --models", file=sys.stderr)
        return 2
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    settings = {"seed": args.seed, "rounds": rounds, "timeout_s": args.timeout, "memory_gib": args.memory_gib,
                "wrong_above": S.WRONG_ABOVE, "selection_rule": M.__doc__.split("\n\n")[1].replace("\n", " "),
                "detection_size": M.DETECTION_SIZE, "yolo_input": M.YOLO_INPUT}
    data = load(args.out) if not args.fresh else {}
    records = {r["id"]: r for r in data.get("models", [])}
    todo = [s for s in specs if not (args.resume and s.id in records)]
    source = reparam_source()
    C.log(f"{len(specs)} models selected, {len(todo)} to measure; reparam from {source['path']} "
          f"({source['commit']}{', modified' if source['dirty'] else ''}); writing {args.out}")

    def save(rec: dict[str, Any]) -> None:
        records[rec["id"]] = {**rec, "reparam_commit": source["commit"], "reparam_dirty": source["dirty"]}
        write(args.out, records, settings, source, args.quick)

    runner = run_in_process if args.in_process else run_in_workers
    t0 = time.perf_counter()
    runner(todo, settings, save, args)
    totals = write(args.out, records, settings, source, args.quick, final=True)
    S.plot(list(records.values()), args.out.with_suffix(".png"), args.quick)
    C.log(f"done in {time.perf_counter() - t0:.0f} s; wrote {args.out} and {args.out.with_suffix('.png')}")
    print(S.totals_text(totals))
    return 0


def choose(specs: list[M.ModelSpec], patterns: str | None, quick: bool) -> list[M.ModelSpec]:
    if quick and not patterns:
        by_id = {s.id: s for s in specs}
        return [by_id[i] for i in M.QUICK if i in by_id]
    if not patterns:
        return specs
    pats = [q.strip() for q in patterns.split(",") if q.strip()]
    return [s for s in specs if any(fnmatch.fnmatch(v, q) for q in pats for v in (s.id, s.name, s.family))]


def reparam_source() -> dict[str, Any]:
    """Where ``reparam`` is imported from (PYTHONPATH decides), the last commit that changed that tree, and
    whether it has uncommitted changes."""
    spec = importlib.util.find_spec("reparam")
    path = Path(spec.origin).parent if spec and spec.origin else None
    out: dict[str, Any] = {"path": str(path), "commit": None, "dirty": None}
    if path is not None:
        git = ["git", "-C", str(path)]
        try:
            out["commit"] = subprocess.run([*git, "log", "-1", "--format=%h", "--", "."], capture_output=True,
                                           text=True, check=True).stdout.strip()  # the last change to reparam/
            out["dirty"] = bool(subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True,
                                               text=True, check=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            pass
    return out


# -- result file ---------------------------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise SystemExit(f"{path}: not a readable sweep result ({err}); pass --fresh to start over") from None


def write(path: Path, records: dict[str, dict], settings: dict, source: dict, quick: bool,
          final: bool = False) -> dict[str, Any]:
    from reparam.measure import environment

    models = sorted(records.values(), key=lambda r: r["id"])
    totals = S.totals(models)
    data = {"benchmark": "model_sweep", "quick": quick, "complete": final, "environment": {
        **environment(threads=1), **M.library_versions()}, "reparam": source, "settings": settings,
        "totals": totals, "models": models}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=C._jsonable, allow_nan=True))
    tmp.replace(path)
    return totals


# -- running the models ------------------------------------------------------------------------------------------
def run_in_process(todo: list[M.ModelSpec], settings: dict, save, args) -> None:
    import _sweep_measure as X
    import torch

    torch.set_num_threads(1)
    for i, spec in enumerate(todo, 1):
        C.log(f"[{i}/{len(todo)}] {spec.id}")
        save(X.measure(spec, settings["seed"], settings["rounds"], log=C.log))


def _worker(conn, seed: int, rounds: int) -> None:
    """Worker process: measure one spec per message until ``None``."""
    import _sweep_measure as X
    import torch

    torch.set_num_threads(1)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send("started")
        conn.send(X.measure(M.ModelSpec.from_dict(msg), seed, rounds, log=C.log))


def _rss_gib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _wait(proc, conn, limit: float, memory_gib: float) -> tuple[str, str] | None:
    """Wait for the worker's next message; ``(status, error)`` if it dies, takes too long or grows too big."""
    t0 = time.monotonic()
    while not conn.poll(1.0):
        if not proc.is_alive():
            return "crashed", f"worker died with exit code {proc.exitcode}"
        if time.monotonic() - t0 > limit:
            return "timeout", f"no result after {limit:.0f} s; worker killed"
        if _rss_gib(proc.pid) > memory_gib:
            return "memory limit", f"worker above {memory_gib:g} GiB resident; killed"
    return None


def run_in_workers(todo: list[M.ModelSpec], settings: dict, save, args) -> None:
    """One worker process at a time; a model that hangs, crashes it or exceeds the memory limit is recorded."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process that has torch's threads
    proc = conn = None
    served = 0

    def stop(kill: bool) -> None:
        nonlocal proc, conn, served
        if proc is not None:
            if kill:
                proc.kill()
            else:
                conn.send(None)
            proc.join(30)
            conn.close()
        proc = conn = None
        served = 0

    try:
        for i, spec in enumerate(todo, 1):
            if proc is None or served >= args.recycle:
                stop(kill=False)
                conn, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, settings["seed"], settings["rounds"]), daemon=True)
                proc.start()
                child.close()
            C.log(f"[{i}/{len(todo)}] {spec.id} ({spec.params / 1e6:.1f}M params)")
            conn.send(spec.to_dict())
            served += 1
            t0 = time.monotonic()
            failure = _wait(proc, conn, STARTUP_S, args.memory_gib)  # the worker's imports are not the model's time
            if failure is None and conn.recv() == "started":
                t0 = time.monotonic()
                failure = _wait(proc, conn, args.timeout, args.memory_gib)
            if failure is None:
                try:
                    rec = conn.recv()
                except (EOFError, OSError) as err:
                    failure = ("crashed", f"worker connection lost ({M.one_line(err)})")
            if failure is not None:
                stop(kill=True)
                rec = {"id": spec.id, "source": spec.source, "name": spec.name, "family": spec.family,
                       "kind": spec.kind, "params": spec.params, "input": list(spec.input_size),
                       "status": failure[0], "error": failure[1], "seconds": time.monotonic() - t0}
            error = f": {rec['error']}" if rec["error"] else ""
            C.log(f"    {rec['status']} in {rec.get('seconds', 0):.0f} s{error}")
            save(rec)
    except BaseException:
        stop(kill=True)
        raise
    stop(kill=False)


if __name__ == "__main__":
    raise SystemExit(main())
