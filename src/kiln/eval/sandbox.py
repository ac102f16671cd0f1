"""Run untrusted Python (programs a model wrote) in a separate, contained process.

Linux is the target. Containment is layered, each layer assuming the one above it may fail:

1. **A separate interpreter**, `python -I -B` (isolated mode: no PYTHON* variables, no user site-packages,
   no script directory on sys.path; no .pyc written), started in a fresh temporary directory that is its
   working directory, HOME and TMPDIR, with a minimal environment (no inherited tokens or keys), stdin
   closed, and a session and process group of its own.
2. **Kernel resource limits**, set by the child before the program's first line: RLIMIT_CPU (CPU seconds,
   then SIGXCPU), RLIMIT_AS (address space: a larger allocation is a MemoryError, not the machine's OOM
   killer), RLIMIT_FSIZE (the largest file it may write), RLIMIT_NOFILE, RLIMIT_NPROC = 0 (no new process or
   thread), RLIMIT_CORE = 0, and an alarm (which the program could cancel; RLIMIT_CPU still ends a busy
   orphan). These hold even if the parent dies.
3. **An audit hook** (PEP 578), installed before the program runs; no API removes one. It refuses: sockets of
   any kind; new processes (fork, exec, system, posix_spawn, subprocess, pty) and signals to other
   processes; writing, creating, removing, renaming or changing anything outside the temporary directory;
   reading or listing a protected directory (the user's real home by default; the interpreter's own files
   and sys.path entries are exempt, since they may live there) and other processes' /proc; opening a device
   other than /dev/null, /dev/zero, /dev/urandom, /dev/random, a directory outside the temporary directory
   (a dir_fd would get around the path checks) or a .pyc not the interpreter's own; chdir, symlinks, hard
   links; ctypes and the modules whose C code reaches files, processes or interpreters without an audit
   event (_posixsubprocess, sqlite3, readline, tkinter, dbm, syslog, subinterpreters, _test*); C extensions
   from outside the standard library (numpy's or torch's C code is not audited: a program importing them
   fails); gc introspection (the way to the hook's own objects), building code objects, replacing a
   function's code, unmarshalling outside the import system, changing rlimits.
4. **The parent**: a wall-clock timeout, after which the whole process group is SIGKILLed; the group is
   killed as well when the program ends, so nothing it started outlives it. stdout and stderr are read as
   they come and kept up to a cap, so a program printing forever fills no memory.

What is NOT guaranteed:
- Audit hooks are not a kernel sandbox (PEP 578 says so): C code that raises no audit event is not seen.
  In CPython 3.11 that includes os.mknod/os.mkfifo (empty files or FIFOs anywhere the user may write) and
  os.pidfd_open + signal.pidfd_send_signal (a signal to any process of the user); they are removed from
  `os`/`posix`/`_signal` before the program starts, but a determined program can re-create a builtin
  module through `_imp`. A memory-corruption bug of the interpreter (crafted bytecode fed through
  importlib's own loader, a known crasher) gets past the hook altogether. The rlimits, the temporary
  directory and the process-group kill are the backstop; for hostile code use a container or VM (nsjail,
  bubblewrap, gVisor) around this.
- Reading ordinary system files (/etc/passwd) is allowed, `os.stat` of any path raises no event (whether a
  file exists leaks), threads are not audited (a program racing its own checks needs them, and RLIMIT_NPROC
  forbids them except for root).
- There is no network namespace: sockets are refused by the hook only.
- Running as root weakens the kernel layer: RLIMIT_NPROC does not bind root, file permissions do not either.
  Run evaluations as an unprivileged user.
- A process that left the group (setsid after a fork the hook failed to stop) is not killed.

Other operating systems: macOS keeps the same layers except that it does not enforce RLIMIT_AS, has no pidfd
(the parent polls for the child's exit) and no /proc; it is untested. Windows has no `resource`, sessions or
process groups: `run_program` raises there.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import pwd
import selectors
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PASSED, FAILED, TIMEOUT, ERROR = "passed", "failed", "timeout", "error"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one program may use."""
    timeout: float = 10.0
    """Wall-clock seconds before the process group is killed."""
    cpu_seconds: int | None = None
    """RLIMIT_CPU; None: the timeout rounded up (the wall clock normally ends it first)."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS, the address space (the interpreter itself takes ~30 MB of it)."""
    file_bytes: int = 16 << 20
    """RLIMIT_FSIZE, the largest file it may write (in its temporary directory)."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    max_output: int = 64 << 10
    """Bytes of stdout and of stderr kept; the rest is read and dropped."""
    protect: tuple[str, ...] | None = None
    """Directories it may not read or list; None: the user's real home (Path.home() and the password entry's)."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one program ended."""
    status: str
    """passed (exit 0) | failed (non-zero exit: an exception, a failed assert, a refused operation, MemoryError)
    | timeout (the wall clock or the CPU limit) | error (killed by another signal, or it could not start)."""
    returncode: int | None
    """The exit status; -N when signal N ended it."""
    stdout: str
    stderr: str
    seconds: float
    truncated: bool = False
    """Some output was beyond `Limits.max_output` and dropped."""

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def run_program(source: str, limits: Limits = Limits(), audit: bool = True) -> Outcome:
    """Run the Python program `source` in the sandbox and say how it ended. `audit=False` leaves out the audit
    hook (the tests use it to check that the rlimits and the process-group kill contain a program alone)."""
    if os.name != "posix":
        raise RuntimeError("kiln's sandbox needs POSIX resource limits, sessions and process groups (Linux)")
    with tempfile.TemporaryDirectory(prefix="kiln-sandbox-", ignore_cleanup_errors=True) as tmp:
        sandbox = os.path.realpath(tmp)
        Path(sandbox, "program.py").write_text(source, encoding="utf-8", errors="replace")
        policy = _policy(sandbox, limits, audit)
        env = {"PATH": "/usr/bin:/bin", "HOME": sandbox, "TMPDIR": sandbox, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        boot = _child_source() + f"\n_child_main({policy!r})\n"
        start = time.monotonic()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", boot], cwd=sandbox, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as e:
            return Outcome(ERROR, None, "", f"could not start the sandbox: {e}", 0.0)
        with proc:
            out, err, truncated, timed_out = _collect(proc, limits)
        return Outcome(_status(proc.returncode, timed_out), proc.returncode, out, err,
                       time.monotonic() - start, truncated)


def run_many(programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
             audit: bool = True) -> list[Outcome]:
    """`run_program` of each program, `workers` at a time (default: one per CPU), in order."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(programs) or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda src: run_program(src, limits, audit), programs))


def protected_dirs() -> tuple[str, ...]:
    """The user's real home: Path.home() (from $HOME) and the password entry's, which $HOME may hide."""
    homes = [str(Path.home())]
    try:
        homes.append(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:   # a uid without a password entry (some containers)
        pass
    return tuple(dict.fromkeys(os.path.realpath(h) for h in homes))


# ---------------------------------------------------------------- parent side


def _policy(sandbox: str, limits: Limits, audit: bool) -> dict:
    """What the child needs to contain itself: plain values, written into its source with repr()."""
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    stdlib = sysconfig.get_path("platstdlib", vars=base)
    extensions = os.path.join(stdlib, "lib-dynload")
    protect = limits.protect if limits.protect is not None else protected_dirs()
    return {"sandbox": sandbox, "program": "program.py", "audit": audit,
            "protect": tuple(os.path.realpath(p) for p in protect),
            "extensions": os.path.realpath(extensions if os.path.isdir(extensions) else stdlib),
            "cpu": limits.cpu_seconds or math.ceil(limits.timeout), "memory": limits.memory_bytes,
            "fsize": limits.file_bytes, "nofile": limits.open_files, "alarm": math.ceil(limits.timeout) + 2}


def _collect(proc: subprocess.Popen, limits: Limits) -> tuple[str, str, bool, bool]:
    """Read the child's output until it has exited and both pipes are closed, or until the timeout; then kill
    its process group and reap it. A pidfd tells when the child exits without reaping it, so its group id
    cannot be reused before the group is killed."""
    deadline = time.monotonic() + limits.timeout
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    dropped = 0
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    pidfd = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ)
    open_pipes, exited, timed_out = 2, False, False
    try:
        while open_pipes or not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left if pidfd is not None else min(left, 0.01)):
                if key.fd == pidfd:
                    exited = True
                    sel.unregister(pidfd)
                    _kill_group(proc)   # whatever it started dies now, and its pipes close
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    open_pipes -= 1
                    continue
                keep = max(0, limits.max_output - len(bufs[key.fd]))
                bufs[key.fd] += chunk[:keep]
                dropped += len(chunk) - min(keep, len(chunk))
            if pidfd is None and not exited:
                exited = proc.poll() is not None   # reaps: on this path the group kill below may come late
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        _kill_group(proc)
        proc.wait()
    out, err = (bytes(b).decode("utf-8", "replace") for b in bufs.values())
    return out, err, dropped > 0, timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):   # the group is gone (or, reaped, its id is someone else's)
        pass


def _status(returncode: int | None, timed_out: bool) -> str:
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGALRM):
        return TIMEOUT
    if returncode == 0:
        return PASSED
    return FAILED if returncode is not None and returncode > 0 else ERROR


@functools.cache
def _child_source() -> str:
    """The source text of the child-side functions below, sent to the child with `-c`."""
    return "\n\n".join(inspect.getsource(f) for f in (_child_main, _make_hook, _hook_verdict, _resolve, _inside))


# ---------------------------------------------------------------- child side
# These functions run inside the sandboxed interpreter. They travel as source text, so they may use no
# module-level name, and the child imports nothing of kiln or of the parent's modules (`subprocess` imported
# there would leave `_posixsubprocess` in sys.modules, where a program finds it without an import the hook
# could refuse). Every refusal puts the hook's frame in the program's hands (in the PermissionError's
# traceback), so `_hook_verdict`, `_resolve` and `_inside` read nothing from globals or builtins: all they
# use comes in `p`, a tuple of strings, frozensets, C functions and these pure functions. Patching builtins,
# os.path or a module global changes nothing the hook decides.


def _child_main(policy):
    """Contain this interpreter (rlimits, the audit hook), then run the program as __main__."""
    import _signal
    import os
    import posix
    import resource
    import sys

    def cap(kind, soft, hard=None):
        hard = soft if hard is None else hard
        current = resource.getrlimit(kind)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(kind, (soft, hard))

    cap(resource.RLIMIT_CPU, policy["cpu"], policy["cpu"] + 1)   # SIGXCPU at the soft limit, SIGKILL a second on
    cap(resource.RLIMIT_AS, policy["memory"])
    cap(resource.RLIMIT_FSIZE, policy["fsize"])   # Python ignores SIGXFSZ: a write past it is an OSError
    cap(resource.RLIMIT_NOFILE, policy["nofile"])
    cap(resource.RLIMIT_NPROC, 0)   # per user, so 0 is the only value that means "no more" (root is exempt)
    cap(resource.RLIMIT_CORE, 0)
    with open(policy["program"], "rb") as f:
        code = compile(f.read(), policy["program"], "exec")
    for module, names in ((os, ("mknod", "mkfifo", "pidfd_open")), (posix, ("mknod", "mkfifo", "pidfd_open")),
                          (_signal, ("pidfd_send_signal",))):
        for name in names:   # C functions that raise no audit event (see the module docstring)
            module.__dict__.pop(name, None)
    if policy["audit"]:
        sys.addaudithook(_make_hook(policy))
    _signal.alarm(policy["alarm"])   # ends the program if the parent died and cannot kill it
    main = type(sys)("__main__")
    main.__file__ = policy["program"]
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def _make_hook(policy):
    """The audit hook: everything it consults is fixed here, before the program runs."""
    import _frozen_importlib_external
    import os
    import posix
    import stat
    import sys

    sandbox, protect = policy["sandbox"], tuple(policy["protect"])
    # The interpreter's own files may sit in a protected home (pyenv, a venv): reading them stays allowed,
    # unless the entry would open the whole protected directory.
    entries = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path)
    code = tuple(dict.fromkeys(
        r for r in (os.path.realpath(e) for e in entries if e)
        if not any(_inside(h, (r,)) for h in protect) and not _inside(r, (sandbox,))))
    where = (sandbox, protect, code, policy["extensions"], "/proc/%d" % posix.getpid())
    refused = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.chdir", "os.symlink", "os.link",
        "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "code.__new__", "sqlite3.connect", "sqlite3.enable_load_extension", "sqlite3.load_extension",
        "webbrowser.open", "os.startfile", "os.add_dll_directory"))
    refused_prefixes = ("socket.", "ctypes.", "syslog.", "_winapi.", "winreg.", "msvcrt.")
    modules = frozenset((
        "ctypes", "_posixsubprocess", "_posixshmem", "_multiprocessing", "readline", "sqlite3", "_sqlite3",
        "tkinter", "_tkinter", "_dbm", "_gdbm", "syslog", "spwd", "nis", "ossaudiodev", "_curses",
        "_curses_panel"))
    module_prefixes = ("_ctypes", "_test", "_xx")
    # event -> which of its arguments are paths, which are dir_fds (refused unless None/-1: a path relative
    # to an fd is one the hook cannot see), at the positions CPython 3.11 raises them.
    path_events = (("os.remove", (0,), (1,)), ("os.rmdir", (0,), (1,)), ("os.mkdir", (0,), (2,)),
                   ("os.rename", (0, 1), (2, 3)), ("os.chmod", (0,), (2,)), ("os.chown", (0,), (3,)),
                   ("os.utime", (0,), (3,)), ("os.truncate", (0,), ()), ("os.chflags", (0,), ()),
                   ("os.lchflags", (0,), ()), ("os.setxattr", (0,), ()), ("os.removexattr", (0,), ()))
    writing = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    rules = (refused, refused_prefixes, modules, module_prefixes, path_events, writing, devices)
    fs = (isinstance, str, bytes, int, str.__str__, bytes.decode, int.__index__,
          posix.getcwd, posix.lstat, posix.readlink, stat.S_ISLNK, OSError)
    checks = (_resolve, _inside, posix.lstat, stat.S_ISDIR, stat.S_ISREG, OSError, isinstance, int, str.__str__,
              sys._getframe, _frozen_importlib_external._compile_bytecode.__code__)
    p = (where, rules, fs, checks)
    verdict, refuse = _hook_verdict, PermissionError

    def hook(event, args):
        reason = verdict(event, args, p)
        if reason is not None:
            raise refuse(f"sandbox refused {event}: {reason}")

    return hook


def _hook_verdict(event, args, p):
    """Why the sandbox refuses audit event `event` with `args`, or None to let it happen."""
    (sandbox, protect, code, extensions, own_proc), rules, fs, checks = p
    refused, refused_prefixes, modules, module_prefixes, path_events, writing, devices = rules
    resolve, inside, lstat, is_dir, is_reg, os_error, isinstance_, int_, to_str, getframe, bytecode = checks
    if event in refused or event.startswith(refused_prefixes):
        return "not allowed in the sandbox"
    if event == "import":
        if args[1] is None:
            top = to_str(args[0]).partition(".")[0]
            if top in modules or top.startswith(module_prefixes):
                return f"module {top} is not available in the sandbox"
        elif not inside(resolve(args[1], fs), (extensions,)):
            return "C extensions load only from the standard library"
        return None
    if event == "object.__setattr__":
        return "replacing a function's code" if args[1] == "__code__" else None
    if event in ("marshal.loads", "marshal.load"):
        return None if getframe(2).f_code is bytecode else "unmarshalling outside the import system"
    for name, paths, dir_fds in path_events:
        if name == event:
            for i in dir_fds:
                if args[i] is not None and args[i] != -1:
                    return "paths relative to a directory fd"
            for i in paths:
                if not inside(resolve(args[i], fs), (sandbox,)):
                    return f"{args[i]!r} is outside the sandbox"
            return None
    if event == "open":
        if isinstance_(args[0], int_):
            return None   # wraps an fd: checked when it was opened, or stdin/stdout/stderr
        real, write = resolve(args[0], fs), args[2] & writing
    elif event in ("os.listdir", "os.scandir"):
        real, write = resolve(args[0], fs), 0
    else:
        return None
    if real.endswith(".pyc") and not inside(real, code):
        return "bytecode from outside the interpreter's own files (crafted bytecode corrupts memory)"
    try:
        mode = lstat(real).st_mode
    except os_error:
        mode = None
    if mode is not None and not is_dir(mode) and not is_reg(mode) and real not in devices:
        return f"{real} is not a regular file"
    if inside(real, (sandbox,)):
        return None
    if event == "open" and mode is not None and is_dir(mode):
        return "opening a directory outside the sandbox (paths relative to it would escape the checks)"
    if write:
        return None if real == "/dev/null" else f"writing {real}, outside the sandbox"
    if inside(real, protect) and not inside(real, code):
        return f"{real} is in a protected directory"
    if real.startswith("/proc/") and real[6:].partition("/")[0].isdigit() and not inside(real, (own_proc,)):
        return "another process's /proc"
    return None


def _resolve(path, fs):
    """`path` (str, bytes, an fd or None for the working directory) as the kernel will find it: absolute, '.'
    and '..' folded, every symlink followed; components that do not exist yet are kept as written."""
    isinstance_, str_, bytes_, int_, to_str, decode, to_int, getcwd, lstat, readlink, is_link, os_error = fs
    if path is None:
        path = getcwd()
    elif isinstance_(path, int_):
        path = readlink("/proc/self/fd/%d" % to_int(path))
    elif isinstance_(path, bytes_):
        path = decode(path, "utf-8", "surrogateescape")
    else:
        path = to_str(path)   # an exact copy of a str subclass; TypeError (so refused) for anything else
    if not path.startswith("/"):
        path = getcwd() + "/" + path
    pending, real, hops = path.split("/")[::-1], "", 0
    while pending:
        part = pending.pop()
        if part == "" or part == ".":
            continue
        if part == "..":
            real = real.rpartition("/")[0]
            continue
        step = real + "/" + part
        try:
            mode = lstat(step).st_mode
        except os_error:   # does not exist (yet)
            real = step
            continue
        if not is_link(mode):
            real = step
            continue
        hops += 1
        if hops > 40:
            raise os_error("too many levels of symbolic links: " + path)
        target = readlink(step)
        if target.startswith("/"):
            real = ""
        pending += target.split("/")[::-1]
    return real or "/"


def _inside(path, roots):
    """`path` is one of `roots` or below one (all absolute and resolved)."""
    for root in roots:
        if path == root or path.startswith(root + "/") or root == "/":
            return True
    return False
