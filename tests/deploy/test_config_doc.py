"""docs/configuration.md against the binaries: every flag a binary's --help
lists is documented there for that binary, with its environment variable
and its default; nothing is documented that a binary does not take; and the
ranges the page states are the ones the binary enforces (a value just
outside one is refused at start-up, naming the flag).

The page's tables each follow a marker, <!-- flags: BINARY ... -->, naming
the binaries they apply to (the shared runtime flags are written once, for
all the binaries that take them)."""
import re
import subprocess

import pytest

from deploy_util import BINARIES, REPO, binary_path, help_options

DOC = REPO / "docs" / "configuration.md"
MARKER = re.compile(r"<!-- flags: ([a-z -]+) -->")
# | `--flag` | `ENV` | `default` | range | meaning |
ROW = re.compile(r"^\|\s*`(--[a-z0-9-]+)`\s*\|\s*`([A-Z0-9_]+)`\s*\|\s*`([^`]*)`\s*\|"
                 r"\s*([^|]*?)\s*\|")
# What every binary prints besides its options.
BUILT_IN = {"--help", "--version"}
# Arguments that get each binary to its range checks without anything else
# failing first (no metrics port, no network, a loopback listener).
SERVICE_ARGS = ["--listen", "127.0.0.1:0", "--metrics-listen", "off"]
BASE_ARGS = {
    "gateway": ["--auth", "dev", *SERVICE_ARGS],
    "offline-model": ["--listen", "127.0.0.1:0"],
}
START_TIMEOUT_S = 15


def documented():
    """{binary: {flag: {"env", "default", "range", "line"}}} from the page."""
    doc = {b: {} for b in BINARIES}
    applies = None  # the binaries of the table being read
    for n, line in enumerate(DOC.read_text().splitlines(), 1):
        m = MARKER.search(line)
        if m:
            applies = m.group(1).split()
            unknown = set(applies) - set(BINARIES)
            assert not unknown, f"configuration.md:{n}: no binary named {sorted(unknown)}"
            continue
        if not line.startswith("|"):
            if line.strip():
                applies = None  # a marker covers the table right after it only
            continue
        row = ROW.match(line)
        if row is None:
            assert not re.match(r"^\|\s*`--", line), \
                f"configuration.md:{n}: a flag row not in the form `--flag` | `ENV` | `default` | ...:\n{line}"
            continue
        assert applies is not None, f"configuration.md:{n}: {row.group(1)} is in a table no " \
                                    "<!-- flags: ... --> marker names binaries for"
        flag, env, default, rng = row.groups()
        for b in applies:
            assert flag not in doc[b], f"configuration.md:{n}: {flag} of {b} is documented twice " \
                                       f"(first on line {doc[b][flag]['line']})"
            doc[b][flag] = {"env": env, "default": default.strip('"') if default == '""' else default,
                            "range": rng, "line": n}
    return doc


DOCUMENTED = documented()


@pytest.mark.parametrize("binary", BINARIES)
def test_every_flag_is_documented_as_the_binary_has_it(binary):
    opts = {f: o for f, o in help_options(binary).items() if f not in BUILT_IN}
    doc = DOCUMENTED[binary]
    missing = sorted(set(opts) - set(doc))
    assert not missing, f"{binary} --help lists {missing}, which docs/configuration.md does not " \
                        f"document for {binary}"
    extra = sorted(set(doc) - set(opts))
    assert not extra, f"docs/configuration.md documents {extra} for {binary}, which " \
                      f"`{binary} --help` does not list"
    for flag, o in opts.items():
        d = doc[flag]
        assert d["env"] == o["env"], \
            f"configuration.md:{d['line']}: {binary} {flag} reads {o['env']}, not {d['env']}"
        assert d["default"] == (o["default"] or ""), \
            f"configuration.md:{d['line']}: {binary} {flag} defaults to {o['default']!r}, " \
            f"not {d['default']!r}"


def bounds(rng: str):
    """(lowest, highest) a range cell states in numbers (None where it
    states none): "1 to 64", "100 to 600000", "1 to 2^40", "0 (none) to
    86400000", "1 and up", "0 (never) or 100 and up". A value below the
    first is taken as it ("0 is taken as 1") states no bound."""
    if "taken as" in rng:
        return None, None
    lo = hi = None
    m = re.search(r"(\d+)(?: \([^)]*\))? (?:to|and up)", rng)
    if m:
        lo = int(m.group(1))
    m = re.search(r"to (\d+)(?:\^(\d+))?\b", rng)
    if m:
        hi = int(m.group(1)) ** int(m.group(2)) if m.group(2) else int(m.group(1))
    return lo, hi


def outside_values():
    """(binary, flag, value) for each value just outside a stated range."""
    for binary, flags in DOCUMENTED.items():
        for flag, d in sorted(flags.items()):
            lo, hi = bounds(d["range"])
            if lo is not None and lo > 0:
                yield binary, flag, lo - 1
            if hi is not None:
                yield binary, flag, hi + 1


def test_the_page_states_ranges_to_check():
    """The range test below has something to check in every service."""
    checked = {b for b, _, _ in outside_values()}
    assert checked >= {"gateway", "router-svc", "llm-svc", "store-svc", "summary-svc"}, checked


@pytest.mark.parametrize("binary,flag,value", list(outside_values()),
                         ids=lambda v: str(v))
def test_a_value_outside_the_documented_range_is_refused(binary, flag, value):
    path = binary_path(binary)
    assert path.exists(), f"{binary} is not built ({path})"
    cmd = [str(path), *BASE_ARGS.get(binary, SERVICE_ARGS), f"{flag}={value}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd)} started and served: {flag} {value} is outside the range "
                    f"docs/configuration.md states, yet it was taken")
    out = r.stdout + r.stderr
    assert r.returncode == 2, f"{' '.join(cmd)} exited {r.returncode}, not 2:\n{out}"
    assert flag in out, f"{' '.join(cmd)} was refused without naming {flag}:\n{out}"


# The range conf_parse enforces, as --help prints it after an option's text.
HELP_RANGE = re.compile(r"\[(-?\d+) to (-?\d+)\]$|\[at least (-?\d+)\]$")
HELP_OPTION = re.compile(r"^\s+(--[a-z0-9][a-z0-9-]*) N\b")


def help_ranges(binary):
    """{flag: (lowest, highest or None)} of the binary's integer options, from
    the ranges in their tables (a plain integer: 0 and up)."""
    r = subprocess.run([str(binary_path(binary)), "--help"], capture_output=True, text=True,
                       timeout=10)
    ranges, flag = {}, None
    for line in (r.stdout + r.stderr).splitlines():
        m = HELP_OPTION.match(line)
        if m:
            flag = m.group(1)
            ranges[flag] = (0, None)
            continue
        m = HELP_RANGE.search(line)
        if flag is not None and m:
            ranges[flag] = ((int(m.group(1)), int(m.group(2))) if m.group(1) is not None
                            else (int(m.group(3)), None))
        flag = None
    return ranges


@pytest.mark.parametrize("binary", BINARIES)
def test_the_page_states_the_ranges_of_the_tables(binary):
    """Where the page states a plain range ("1 to 64", "1 and up"), it is the
    one the option table declares (conf_parse checks it; --help prints it).
    Ranges that depend on another option or have a hole are checked by hand
    and by the test above."""
    path = binary_path(binary)
    assert path.exists(), f"{binary} is not built ({path})"
    for flag, (lo, hi) in help_ranges(binary).items():
        d = DOCUMENTED[binary].get(flag)
        if d is None or " or " in d["range"] or "taken as" in d["range"] or "--" in d["range"]:
            continue
        dlo, dhi = bounds(d["range"])
        if dlo is None and dhi is None:
            continue
        assert (dlo, dhi) == (lo, hi), \
            f"configuration.md:{d['line']}: {binary} {flag} says {d['range']!r}; its table " \
            f"says {lo} to {hi if hi is not None else 'any'}"
