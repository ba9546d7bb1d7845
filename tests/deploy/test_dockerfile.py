"""deploy/Dockerfile stays in step with deploy/install-deps.sh (one package
list) and with what the binaries link (each runtime image installs exactly
the shared libraries its binary needs). Docker itself is not needed: the
file is parsed, the built binaries are inspected with readelf/ldd/dpkg."""
import functools
import re
import shutil
import subprocess

import pytest

from deploy_util import BINARIES, DEPLOY, binary_path, build_dir, help_options

DOCKERFILE = DEPLOY / "Dockerfile"
# Part of every Debian image, or of a sanitizer build only (tests/run.sh).
BASE_PACKAGES = {"libc6", "libgcc-s1", "zlib1g", "libasan8", "libubsan1", "libstdc++6"}
# ca-certificates: not linked, but TLS to the model / database needs it.
OPTIONAL = {"ca-certificates"}
# Loaded with dlopen at start-up, so absent from the binary's NEEDED list:
# {binary: {package: the file it must hold}}.
PLUGINS = {"gateway": {"libwebsockets-evlib-ev": "libwebsockets-evlib_ev.so"}}


def parse():
    """Stages of the Dockerfile: {name: {"from": str, "instrs": [(KEYWORD, text)]}}, and ARG defaults."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages, args, cur = {}, {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kw, _, rest = line.partition(" ")
        kw = kw.upper()
        if kw == "ARG" and cur is None:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif kw == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.I)
            base = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), ""), m.group(1))
            cur = m.group(2)
            stages[cur] = {"from": base, "instrs": []}
        elif cur is not None:
            stages[cur]["instrs"].append((kw, rest.strip()))
    return stages


def apt_packages(stage):
    pkgs = []
    for kw, text in stage["instrs"]:
        if kw != "RUN":
            continue
        for cmd in text.split("&&"):
            m = re.search(r"apt-get install (.*)", cmd)
            if m:
                pkgs += [w for w in m.group(1).split() if not w.startswith("-")]
    return pkgs


def chain(stages, name):
    """The stage and the stages it is built FROM, nearest first."""
    out = []
    while name in stages:
        out.append(stages[name])
        name = stages[name]["from"]
    return out


def install_deps_list():
    r = subprocess.run(["bash", str(DEPLOY / "install-deps.sh"), "--list"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_build_stage_installs_the_install_deps_list():
    stages = parse()
    build = stages["build"]
    assert build["from"] == "debian:12"
    pkgs = apt_packages(build)
    runs = " ".join(t for k, t in build["instrs"] if k == "RUN")
    if re.search(r"apt-get install [-a-z ]*\$\(bash /src/deploy/install-deps.sh --list\)", runs):
        # It reads the list itself: check it is the file it copied in.
        assert ("COPY", "deploy/install-deps.sh /src/deploy/install-deps.sh") in build["instrs"]
    else:
        assert sorted(pkgs) == sorted(install_deps_list()), \
            "deploy/Dockerfile's build packages differ from deploy/install-deps.sh PACKAGES"
    assert "-DCMAKE_BUILD_TYPE=Release" in runs and "-DCONVO_SANITIZE=OFF" in runs


@pytest.mark.parametrize("binary", BINARIES)
def test_runtime_stage(binary):
    stages = parse()
    assert binary in stages, f"no stage {binary} in deploy/Dockerfile"
    ch = chain(stages, binary)
    assert ch[-1]["from"] == "debian:12-slim"
    instrs = [i for s in reversed(ch) for i in s["instrs"]]
    users = [t for k, t in instrs if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as a non-root user"
    assert ("ENTRYPOINT", f'["/usr/bin/{binary}"]') in instrs
    assert any(k == "COPY" and t.endswith(f"/usr/bin/{binary} /usr/bin/{binary}") for k, t in instrs)
    assert any(k == "HEALTHCHECK" for k, _ in ch[0]["instrs"]), "a HEALTHCHECK"
    exposed = [int(t) for k, t in ch[0]["instrs"] if k == "EXPOSE"]
    opts = help_options(binary)
    default_port = {"gateway": 8000}.get(binary) or int(opts["--listen"]["default"].rsplit(":", 1)[1])
    assert exposed == [default_port]
    envs = {o["env"] for o in opts.values() if o["env"]} | ({"HOST", "PORT"} if binary == "gateway" else set())
    for k, t in instrs:
        if k == "ENV":
            for name in re.findall(r"(\w+)=", t):
                assert name in envs or name == "DEBIAN_FRONTEND", f"ENV {name}: not read by {binary}"


def _owners(paths):
    """{path: Debian package} for library paths, in one dpkg -S call (each
    asked as /usr/lib/... and /lib/...: merged /usr)."""
    variants = {}
    for p in paths:
        alt = p[4:] if p.startswith("/usr/lib/") else "/usr" + p if p.startswith("/lib/") else p
        variants[p] = {p, alt}
    r = subprocess.run(["dpkg", "-S", *sorted(set().union(*variants.values()))],
                       capture_output=True, text=True)
    owner = {}
    for line in r.stdout.splitlines():
        pkg, _, f = line.partition(": ")
        owner[f.strip()] = pkg.split(":")[0].split(",")[0].strip()
    return {p: next((owner[v] for v in vs if v in owner), None) for p, vs in variants.items()}


@functools.lru_cache(maxsize=None)
def _depends(pkg):
    """Direct Depends/Pre-Depends of an installed package (names only)."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Depends}, ${Pre-Depends}", pkg],
                       capture_output=True, text=True)
    return {d.split()[0].split(":")[0] for alt in r.stdout.split(",") for d in alt.split("|")[:1] if d.strip()}


def closure(pkgs):
    seen, todo = set(), list(pkgs)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(_depends(p))
    return seen


def _dynsyms(path, which):
    out = subprocess.run(["nm", "-D", which, str(path)], capture_output=True, text=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def needed_packages(path):
    """Debian packages of the shared libraries `path` uses: those among its
    NEEDED entries that define at least one of its undefined symbols. (A
    sanitizer build lists every library it was linked with as NEEDED; a
    Release build, which the images hold, only the used ones; the symbols
    give the same answer for both.)"""
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]",
                        subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout)
    where = {}
    for line in subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if m:
            where[m.group(1)] = m.group(2)
    missing = [lib for lib in needed if lib not in where]
    assert not missing, f"{path}: ldd does not find {missing}"
    undefined = _dynsyms(path, "--undefined-only")
    used = [lib for lib in needed if undefined & _dynsyms(where[lib], "--defined-only")]
    owners = _owners([where[lib] for lib in used])
    unknown = [p for p, o in owners.items() if o is None]
    assert not unknown, f"no Debian package holds {unknown}"
    return set(owners.values()) - BASE_PACKAGES


@pytest.mark.parametrize("binary", BINARIES)
def test_runtime_stage_has_exactly_the_linked_libraries(binary):
    if not all(shutil.which(t) for t in ("dpkg", "readelf", "nm", "ldd")):
        pytest.skip("needs dpkg, ldd, readelf and nm (Debian, binutils)")
    path = binary_path(binary)
    assert path.exists(), f"{binary} is not built ({path}): build the project before its tests"
    need = needed_packages(path)
    have = {p for s in chain(parse(), binary) for p in apt_packages(s)}
    # What apt brings in with the listed packages covers every linked library...
    assert need <= closure(have), f"the {binary} image lacks {sorted(need - closure(have))}"
    # ...and nothing is listed that the binary does not link or load.
    plugins = PLUGINS.get(binary, {})
    assert have - OPTIONAL - set(plugins) <= need, \
        f"the {binary} image installs unneeded {sorted(have - OPTIONAL - set(plugins) - need)}"
    for pkg, lib in plugins.items():
        assert pkg in have, f"the {binary} image lacks {pkg}, which it loads at start-up"
        files = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True).stdout
        assert any(f.endswith("/" + lib) for f in files.split()), f"{pkg} does not hold {lib}"


def test_runtime_package_names_exist_in_debian():
    if shutil.which("apt-cache") is None:
        pytest.skip("no apt-cache")
    names = sorted({p for s in parse().values() for p in apt_packages(s)
                    if re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", p)})
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", *names], capture_output=True, text=True)
    if "No packages found" in r.stderr and not r.stdout:
        pytest.skip("apt lists not downloaded (apt-get update)")
    found = set(re.findall(r"^Package: (\S+)", r.stdout, re.M))
    assert found == set(names), f"unknown Debian packages: {sorted(set(names) - found)}"


def test_build_stage_installs_the_web_pages_npm_packages_before_cmake():
    """The page's marked and DOMPurify come from npm (gateway/web/package.json),
    never from the repository: the build stage installs them after copying the
    source (the context leaves node_modules out) and before CMake installs the
    page."""
    build = parse()["build"]
    instrs = build["instrs"]
    copy_src = instrs.index(("COPY", ". /src"))
    runs = [(i, t) for i, (k, t) in enumerate(instrs) if k == "RUN"]
    web = [i for i, t in runs if "/src/deploy/install-deps.sh --web" in t]
    assert web and web[0] > copy_src, "npm install of gateway/web after COPY . /src"
    install = next(i for i, t in runs if "cmake --install" in t)
    text = dict(runs)[install]
    assert web[0] < install or text.index("install-deps.sh --web") < text.index("cmake --install")
    assert "**/node_modules" in (DEPLOY / "Dockerfile.dockerignore").read_text().split()


def test_gateway_image_holds_the_page_and_every_vendor_file_it_loads(tmp_path):
    """What CMake installs for the gateway (the files the gateway image
    copies from /out/usr/share/convo/web): the page, and under vendor/ each
    third-party file index.html loads, with its licence; no node_modules or
    npm manifests."""
    ch = chain(parse(), "gateway")
    copies = [t for s in ch for k, t in s["instrs"] if k == "COPY"]
    assert "--from=build /out/usr/share/convo/web /usr/share/convo/web" in copies
    script = build_dir() / "gateway" / "cmake_install.cmake"
    assert script.exists(), f"the project is not configured in {build_dir()}"
    r = subprocess.run(["cmake", f"-DCMAKE_INSTALL_PREFIX={tmp_path}", "-P", str(script)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    web = tmp_path / "share" / "convo" / "web"
    html = (web / "index.html").read_text()
    loads = re.findall(r'<script[^>]* src="([^"]+)"', html) + re.findall(r'<link[^>]* href="([^"]+)"', html)
    vendor = [p for p in loads if p.startswith("vendor/")]
    assert len(vendor) == 2, loads
    for rel in loads:
        assert (web / rel).is_file(), f"index.html loads {rel}, which is not installed"
    for js in web.glob("*.js"):
        for imp in re.findall(r'^import .* from "\./([^"]+)";$', js.read_text(), re.M):
            assert (web / imp).is_file(), f"{js.name} imports {imp}, which is not installed"
    for pkg in ("dompurify", "marked"):
        assert (web / "vendor" / pkg / "LICENSE").is_file(), f"{pkg}'s licence"
    assert not (web / "vendor").is_symlink()
    names = {p.name for p in web.rglob("*")}
    assert not names & {"node_modules", "package.json", "package-lock.json"}, names
