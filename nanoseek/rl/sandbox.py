"""Run untrusted Python (a model's code) against tests, in a subprocess with limits.

Each run gets a fresh temporary directory (its cwd, HOME and TMPDIR, deleted afterwards)
and a new Python process (`python -I`, a minimal environment) that sets itself up before
the first line of the solution runs:

    time      the parent kills the whole process group after `time_limit` seconds
              (wall clock); RLIMIT_CPU is set to the same as a second stop.
    memory    RLIMIT_AS (address space, default 512 MB): a memory bomb gets MemoryError
              or is killed by the kernel, never the machine's memory.
    files     RLIMIT_FSIZE 64 MB per file, RLIMIT_CORE 0.
    network   a new network namespace (unshare(CLONE_NEWNET) through libc) with no
              interfaces up, not even loopback: every connection fails in the kernel.
    writes    a new mount namespace (private propagation, so nothing reaches the host) in
              which every mount is remounted read-only except a bind mount of the
              working directory; then all capabilities are dropped (bounding set
              included, no_new_privs set) so the code cannot remount, unshare again or
              regain them through exec.
    backstop  in the Python process itself, socket creation and Python-level writes
              outside the working directory (open/io.open/os.open with a write mode,
              os.mkdir/remove/rename/...) raise PermissionError.

The namespaces need CAP_SYS_ADMIN (root, as in our containers). Without it the runner
keeps only the Python-level backstop, and `SandboxResult.isolation` says so
({"net": "netns" | "python", "fs": "readonly-mounts" | "python"}). Limits, honestly:
  * the Python backstop alone is not a security boundary: ctypes, `_io.FileIO`, `_socket`
    or a child process get past it. It only stops accidents.
  * with namespaces, the code still runs as uid 0 (without capabilities) and can read
    every file the host can (secrets included) and write to device nodes such as /dev/null
    and to the working directory. It may start processes (they inherit the namespaces and
    rlimits); rlimits are per process, not per tree, and a child that leaves the process
    group (setsid) escapes the time-limit kill, living on until RLIMIT_CPU ends it if it
    computes, or indefinitely if it sleeps. A fork bomb is stopped only by the time limit
    and the kernel's pid limits. There is no seccomp filter and no cgroup.
  * results come back on stdout behind a random nonce, but the solution runs in the same
    interpreter as the test harness, so determined reward hacking (reading the nonce from
    memory, patching AssertionError) is possible. Treat rewards from code as evidence for
    training, not proof of correctness, and read samples.
For hostile code at scale use a VM- or gVisor-level sandbox instead.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

# The harness that runs inside the child. Its own setup comes first; the solution and the
# tests arrive on stdin as JSON so they never touch the command line or the environment.
_RUNNER = r'''
import ctypes, io, json, os, resource, sys, traceback
payload = json.loads(sys.stdin.read())
nonce, work = payload["nonce"], os.path.realpath(os.getcwd())
mem = payload["memory_mb"] * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (payload["cpu_s"], payload["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
isolation = {"net": "python", "fs": "python"}
try:
    if not payload["isolate"]:
        raise RuntimeError("namespaces not requested")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
        isolation["net"] = "netns"
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
        1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
    if (libc.unshare(0x20000) == 0  # CLONE_NEWNS
            and libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
            and libc.mount(work.encode(), work.encode(), None, MS_BIND, None) == 0):
        os.chdir(work)  # onto the bind mount (the old cwd is the soon read-only one)
        ok = True
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        for fields in mounts:
            point = fields[4].encode().decode("unicode_escape").encode("latin-1")
            if point == work.encode():
                continue
            opts = fields[5].split(",")
            flags = (MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID * ("nosuid" in opts)
                     | MS_NODEV * ("nodev" in opts) | MS_NOEXEC * ("noexec" in opts))
            if libc.mount(None, point, None, flags, None) != 0 and "ro" not in opts:
                ok = False  # (proc-like mounts may refuse; noted, the backstop stays)
        # drop every capability: bounding set, then effective/permitted/inheritable
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        if libc.capset(header, data) == 0 and ok:
            isolation["fs"] = "readonly-mounts"
except Exception:
    pass

# Python-level backstop (also the only guard where namespaces are unavailable)
import builtins, socket
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the sandbox")
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()
socket.socket = _NoSocket
socket.create_connection = socket.getaddrinfo = socket.socketpair = _no_network
def _inside(path):
    if isinstance(path, int):
        return True
    p = os.path.realpath(os.fsdecode(path))
    return p == work or p.startswith(work + os.sep) or p == os.devnull
def _guard(path):
    if not _inside(path):
        raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")
_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _guard(file)
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open
_os_open = os.open
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE:
        _guard(path)
    return _os_open(path, flags, *args, **kwargs)
os.open = _guarded_os_open
def _guarded(fn, n_paths=1):
    def wrapper(*args, **kwargs):
        for p in args[:n_paths]:
            _guard(p)
        return fn(*args, **kwargs)
    return wrapper
for name in ("mkdir", "remove", "unlink", "rmdir", "chmod", "truncate", "utime", "mkfifo"):
    setattr(os, name, _guarded(getattr(os, name)))
for name in ("rename", "replace", "link", "symlink"):
    setattr(os, name, _guarded(getattr(os, name), 2))
del ctypes

def _reporter(nonce):
    def report(result):
        sys.__stdout__.write("\n" + nonce + " " + json.dumps(result) + "\n")
        sys.__stdout__.flush()
    return report
report, tests, code = _reporter(payload.pop("nonce")), payload["tests"], payload["code"]
del nonce, payload

passed, error = 0, None
namespace = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(code, "solution.py", "exec"), namespace)
    solution_ok = True
except BaseException:
    solution_ok, error = False, traceback.format_exc(limit=3)
if solution_ok:
    for source, is_assert in tests:
        try:
            exec(compile(source, "tests.py", "exec"), namespace)
            passed += is_assert
        except BaseException:
            if error is None:
                error = traceback.format_exc(limit=3)
sys.stdout.flush()
report({"passed": passed, "solution_ok": solution_ok, "isolation": isolation, "error": error})
os._exit(0)
'''


@dataclass
class SandboxResult:
    passed: int  # asserts that passed
    total: int  # asserts in the tests
    status: str  # "ok" (the harness finished), "timeout", "crashed" (no result line)
    solution_ok: bool = False  # the solution code ran to its end without an exception
    isolation: dict = field(default_factory=dict)
    error: str | None = None  # the first traceback, or stderr's tail when crashed
    stdout: str = ""
    workdir: str = ""  # where it ran (already deleted)

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def split_tests(tests: str) -> list[tuple[str, bool]]:
    """Top-level statements of a test script as (source, is_assert): each assert counts
    on its own; other statements (imports, helpers) run in order without counting."""
    tree = ast.parse(tests)
    return [(ast.unparse(node), isinstance(node, ast.Assert)) for node in tree.body]


def run_python(code: str, tests: str, time_limit: float = 5.0, memory_mb: int = 512,
               isolate: bool = True, python: str = sys.executable) -> SandboxResult:
    """Run `code`, then each top-level statement of `tests`, in a fresh sandboxed process.
    `isolate=False` skips the namespaces (only the in-process backstop then guards)."""
    test_items = split_tests(tests)
    total = sum(is_assert for _, is_assert in test_items)
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "code": code, "tests": test_items, "isolate": isolate,
                          "memory_mb": memory_mb, "cpu_s": max(1, int(time_limit) + 1)})
    workdir = tempfile.mkdtemp(prefix="nanoseek-sandbox-")
    try:
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        # output goes to files, not pipes: RLIMIT_FSIZE then bounds a print loop too
        with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
            proc = subprocess.Popen([python, "-I", "-c", _RUNNER], cwd=workdir, env=env,
                                    stdin=subprocess.PIPE, stdout=out_f, stderr=err_f,
                                    start_new_session=True)
            status = "ok"
            try:
                try:
                    proc.stdin.write(payload.encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                proc.wait(timeout=time_limit)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_group(proc)  # the code, and anything it left running in its group
                proc.wait()
            out_f.seek(0)
            err_f.seek(0)
            stdout, stderr = _text(out_f.read(1 << 20)), _text(err_f.read(1 << 20))
        if status == "timeout":
            return SandboxResult(0, total, "timeout", stdout=stdout, workdir=workdir,
                                 error=f"time limit of {time_limit} s exceeded")
        for line in reversed(stdout.splitlines()):
            if line.startswith(nonce + " "):
                report = json.loads(line[len(nonce) + 1:])
                return SandboxResult(report["passed"], total, "ok", report["solution_ok"],
                                     report["isolation"], report["error"],
                                     stdout[: stdout.rfind(nonce)], workdir)
        return SandboxResult(0, total, "crashed", stdout=stdout, workdir=workdir,
                             error=stderr[-2000:] or f"exit code {proc.returncode}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _text(b: bytes | None) -> str:
    return (b or b"").decode("utf-8", errors="replace")
