#!/usr/bin/python3
"""Runs the store benchmark end to end: a throwaway PostgreSQL (harness),
store-svc in front of it, and the C load generator bench_store against it,
once per batch size. Not a test; prints a table with the CPU model: events/s
and the CPU time PostgreSQL and store-svc spent per stored event (each batch
size measured alone). See store-svc/README.md.

    /usr/bin/python3 tests/store/bench_store.py [--build DIR] [--durable]
        [--pool-size N] [--batches 1,10,100,1000] [-- bench_store options (--sessions, --scale, ...)]

--build is the CMake build tree holding store-svc/store-svc and
tests/store/bench_store (default $CONVO_BUILD_DIR or <repo>/build); use a
build without sanitizers for figures worth quoting. PostgreSQL runs with the
harness's fsync=off unless --durable (fsync=on, synchronous_commit=on: every
acknowledged batch is on disk). The last batch size's sessions are read
back with ListEvents."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))


def cpu_model():
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", help="CMake build tree (default: $CONVO_BUILD_DIR or <repo>/build)")
    ap.add_argument("--durable", action="store_true", help="PostgreSQL with fsync=on")
    ap.add_argument("--pool-size", type=int, default=4, help="store-svc --db-pool-size")
    ap.add_argument("--batches", default="1,10,100,1000", help="batch sizes, in order")
    ap.add_argument("--store-arg", action="append", default=[], metavar="ARG",
                    help="an extra store-svc option (repeatable), e.g. --store-arg=--append-group-ms=0")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then bench_store options")
    args = ap.parse_args()
    if args.build:
        os.environ["CONVO_BUILD_DIR"] = str(Path(args.build).resolve())
    batches = [int(b) for b in args.batches.split(",")]

    # after CONVO_BUILD_DIR is set
    from harness import Postgres, Service, build_dir, process_cpu_seconds

    bench = build_dir() / "tests" / "store" / "bench_store"
    if not bench.exists():
        print(f"{bench} not found: build the bench_store target", file=sys.stderr)
        return 2
    settings = {"fsync": "on", "synchronous_commit": "on"} if args.durable else {}
    # Room for the bigger batches (WAL) and the sessions' rows in memory.
    settings.update({"shared_buffers": "256MB", "max_wal_size": "2GB"})
    rest = [a for a in args.rest if a != "--"]
    status = 0
    with Postgres(settings=settings) as pg:
        with Service("store-svc", args=["--db-pool-size", str(args.pool_size),
                                        "--log-level", "warn", *args.store_arg],
                     env={"DATABASE_URL": pg.url}) as store:
            print(f"PostgreSQL {pg.bindir.parent.name} "
                  f"({'fsync on' if args.durable else 'fsync off'}), "
                  f"store-svc with {args.pool_size} database workers {' '.join(args.store_arg)}; "
                  f"{cpu_model()}, "
                  f"{os.cpu_count()} CPUs, load average before "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            print(f"{'run':<28} {'events':>12} {'events/s':>14} {'PG µs/event':>12} "
                  f"{'store-svc µs/event':>19}")
            sys.stdout.flush()
            # Each batch size alone, so the CPU figures are its own; then the
            # last size again, read back with ListEvents (its appends not shown twice).
            for i, batch in enumerate(batches + batches[-1:]):
                reads = i == len(batches)
                pg0, st0 = pg.cpu_seconds(), process_cpu_seconds(store.pid)
                argv = [str(bench), "--store", store.addr, "--batch", str(batch), *rest]
                r = subprocess.run(argv + ([] if reads else ["--no-list"]),
                                   capture_output=True, text=True)
                pg_cpu = pg.cpu_seconds() - pg0
                st_cpu = process_cpu_seconds(store.pid) - st0
                sys.stderr.write(r.stderr)
                status |= r.returncode
                for line in r.stdout.splitlines():
                    cols = line.rsplit(None, 2)
                    if len(cols) != 3 or not cols[1].isdigit():
                        continue
                    name, events, rate = cols
                    if name.startswith("AppendEvents") and not reads:
                        n = int(events)
                        print(f"{name:<28} {events:>12} {rate:>14} {pg_cpu / n * 1e6:>12.1f} "
                              f"{st_cpu / n * 1e6:>19.1f}")
                    elif name.startswith("ListEvents"):
                        print(f"{name:<28} {events:>12} {rate:>14}")
                sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
