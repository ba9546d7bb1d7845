#!/usr/bin/python3
"""Runs the store benchmark end to end: a throwaway PostgreSQL (harness),
store-svc in front of it, and the C load generator bench_store against it.
Not a test; prints bench_store's table. See store-svc/README.md.

    /usr/bin/python3 tests/store/bench_store.py [--build DIR] [--durable]
        [--pool-size N] [-- bench_store options (--sessions, --scale, ...)]

--build is the CMake build tree holding store-svc/store-svc and
tests/store/bench_store (default $CONVO_BUILD_DIR or <repo>/build); use a
build without sanitizers for figures worth quoting. PostgreSQL runs with the
harness's fsync=off unless --durable (fsync=on, synchronous_commit=on: every
acknowledged batch is on disk)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", help="CMake build tree (default: $CONVO_BUILD_DIR or <repo>/build)")
    ap.add_argument("--durable", action="store_true", help="PostgreSQL with fsync=on")
    ap.add_argument("--pool-size", type=int, default=4, help="store-svc --db-pool-size")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then bench_store options")
    args = ap.parse_args()
    if args.build:
        os.environ["CONVO_BUILD_DIR"] = str(Path(args.build).resolve())

    from harness import Postgres, Service, build_dir  # after CONVO_BUILD_DIR is set

    bench = build_dir() / "tests" / "store" / "bench_store"
    if not bench.exists():
        print(f"{bench} not found: build the bench_store target", file=sys.stderr)
        return 2
    settings = {"fsync": "on", "synchronous_commit": "on"} if args.durable else {}
    # Room for the bigger batches (WAL) and the sessions' rows in memory.
    settings.update({"shared_buffers": "256MB", "max_wal_size": "2GB"})
    rest = [a for a in args.rest if a != "--"]
    with Postgres(settings=settings) as pg:
        with Service("store-svc", args=["--db-pool-size", str(args.pool_size),
                                        "--log-level", "warn"],
                     env={"DATABASE_URL": pg.url}) as store:
            print(f"PostgreSQL {pg.bindir.parent.name} "
                  f"({'fsync on' if args.durable else 'fsync off'}), "
                  f"store-svc with {args.pool_size} database workers, {os.cpu_count()} CPUs")
            sys.stdout.flush()
            r = subprocess.run([str(bench), "--store", store.addr, *rest])
            return r.returncode


if __name__ == "__main__":
    sys.exit(main())
