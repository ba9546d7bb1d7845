#!/usr/bin/python3
"""Every function a C file exports is called from another file or a test.

Reads the symbol tables of the build tree's object files (binutils' nm): a
global function defined in one object and referenced by no other object is
either dead or should be static. Generated protobuf-c code and `main` are left
out; objects under tests/ count as callers, never as definers.

Usage: exports.py BUILD_DIR SOURCE_DIR   (exit 1 and one line per offender;
objects whose source file is gone, left in an older build tree, are skipped)
"""
import collections
import pathlib
import subprocess
import sys


def symbols(obj):
    out = subprocess.run(["nm", "-g", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "T":
            yield "def", parts[2]
        elif len(parts) == 2 and parts[0] == "U":
            yield "use", parts[1]


def source_of(obj, build, source):
    """build/gateway/CMakeFiles/gw.dir/session.c.o -> source/gateway/session.c"""
    parts = obj.relative_to(build).parts
    i = parts.index("CMakeFiles")
    return source.joinpath(*parts[:i], *parts[i + 2:-1], obj.name.removesuffix(".o"))


def main(build, source):
    objs = [o for o in build.rglob("*.o")
            if "CMakeTmp" not in o.parts and ".pb-c." not in o.name
            and "CMakeFiles" in o.parts and source_of(o, build, source).exists()]
    if not objs:
        print(f"no object files under {build}: build first", file=sys.stderr)
        return 2
    defined = collections.defaultdict(set)
    used = collections.defaultdict(set)
    for o in objs:
        is_test = "tests" in o.relative_to(build).parts
        for kind, sym in symbols(o):
            if kind == "use":
                used[sym].add(o)
            elif not is_test and sym != "main":
                defined[sym].add(o)
    bad = sorted((sym, sorted({o.name.removesuffix(".o") for o in where}))
                 for sym, where in defined.items() if not used[sym] - where)
    for sym, files in bad:
        print(f"{sym}: exported by {', '.join(files)} and called from no other file "
              f"(make it static or remove it)")
    print(f"{len(defined)} exported functions checked, {len(bad)} without a caller elsewhere")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2]).resolve()))
