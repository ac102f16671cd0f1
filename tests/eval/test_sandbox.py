"""The sandbox contains hostile programs: each layer on its own where it can be tested alone (audit=False
leaves only the rlimits, the temporary directory and the process-group kill)."""

import dis
import os
import signal
import socket
import stat
import sys
import textwrap
import time

import psutil
import pytest

from kiln.eval import sandbox
from kiln.eval.sandbox import Limits, protected_dirs, run_many, run_program

pytestmark = pytest.mark.timeout(60)
ROOT = os.geteuid() == 0


def run(src: str, **kw):
    return run_program(textwrap.dedent(src), **kw)


def refused(outcome, what: str = "") -> bool:
    return outcome.status == "failed" and f"sandbox refused {what}" in outcome.stderr


def gone(pid: int) -> bool:
    """Not running: reaped, or a zombie waiting for a reaper that is not ours."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def no_strays():
    """Fails the test if it leaves a child (or grandchild) of the test process running."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and not gone(p.pid)]
    assert not left, f"still running: {left}"


# ---------------------------------------------------------------- ordinary programs


def test_program_runs_reads_the_standard_library_and_exit_status_maps():
    ok = run("import collections, json, math, re, typing\nprint(math.comb(5, 2))")
    assert (ok.status, ok.returncode, ok.stdout, ok.stderr) == ("passed", 0, "10\n", "")
    assert run("import sys; sys.exit(0)").passed
    bad = run("assert 1 + 1 == 3")
    assert bad.status == "failed" and bad.returncode == 1 and "AssertionError" in bad.stderr
    assert run("import sys; sys.exit(3)").returncode == 3
    assert run("def f(:").status == "failed"


def test_environment_is_minimal_and_isolated(monkeypatch):
    monkeypatch.setenv("KILN_TEST_SECRET_TOKEN", "s3cret-value")
    r = run("""
        import os, sys
        print(sorted(os.environ))
        print(os.environ["HOME"] == os.getcwd() == os.environ["TMPDIR"], sys.flags.isolated, sys.dont_write_bytecode)
        print(sys.stdin.read() == "")
    """)
    assert r.passed, r.stderr
    assert "s3cret" not in r.stdout and "KILN_TEST" not in r.stdout
    assert r.stdout.splitlines()[1:] == ["True 1 True", "True"]


def test_rlimits_are_the_requested_ones():
    limits = Limits(timeout=3, memory_bytes=512 << 20, file_bytes=1 << 20, open_files=32)
    r = run("""
        import resource as r
        for name in ("CPU", "AS", "FSIZE", "NOFILE", "NPROC", "CORE"):
            print(name, r.getrlimit(getattr(r, "RLIMIT_" + name))[0])
    """, limits=limits)
    assert r.passed, r.stderr
    got = dict(line.split() for line in r.stdout.splitlines())
    assert got == {"CPU": "3", "AS": str(512 << 20), "FSIZE": str(1 << 20), "NOFILE": "32", "NPROC": "0", "CORE": "0"}


def test_writing_inside_the_sandbox_works():
    r = run("""
        import os, pathlib, shutil, tempfile
        pathlib.Path("a.txt").write_text("hello")
        os.mkdir("d"); shutil.copy("a.txt", "d/b.txt"); os.rename("d/b.txt", "c.txt"); os.remove("a.txt")
        with tempfile.TemporaryFile() as f:
            f.write(b"x"); f.seek(0); assert f.read() == b"x"
        print(sorted(os.listdir(".")), open("c.txt").read())
    """)
    assert r.passed, r.stderr
    assert r.stdout == "['c.txt', 'd', 'program.py'] hello\n"


def test_run_many_keeps_order_and_runs_side_by_side():
    start = time.monotonic()
    outs = run_many([f"import time; time.sleep(0.5); print({i})" for i in range(4)], workers=4)
    assert [o.stdout for o in outs] == ["0\n", "1\n", "2\n", "3\n"]
    assert time.monotonic() - start < 1.9   # 4 x 0.5 s one after another would take 2 s


# ---------------------------------------------------------------- time


@pytest.mark.parametrize("body", ["while True: pass", "import time; time.sleep(60)"], ids=["busy", "sleeping"])
def test_endless_program_times_out_and_its_group_is_killed(body, no_strays):
    r = run(f"import os\nprint(os.getpid(), flush=True)\n{body}", limits=Limits(timeout=1))
    assert r.status == "timeout" and 0.9 < r.seconds < 5
    assert gone(int(r.stdout))


def test_cpu_limit_ends_a_busy_program_without_the_wall_clock():
    r = run("while True: pass", limits=Limits(timeout=30, cpu_seconds=1))
    assert r.status == "timeout" and r.returncode == -signal.SIGXCPU and r.seconds < 10


# ---------------------------------------------------------------- processes


@pytest.mark.parametrize("body", [
    "import os\nwhile True: os.fork()",
    "import os\nos.system('sh -c \":(){ :|:& };:\"')",
    "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'sleep 60'], {})",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'sleep 60'])",
    "import subprocess\nsubprocess.run(['sleep', '60'])",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import os\nos.kill(os.getppid(), 0)",
    "import pty\npty.fork()",
], ids=["fork-bomb", "system", "posix_spawn", "exec", "subprocess", "multiprocessing", "kill-parent", "pty"])
def test_new_processes_and_signals_are_refused(body, no_strays):
    r = run(body, limits=Limits(timeout=5))
    assert refused(r), r.stderr


@pytest.mark.skipif(not ROOT, reason="as root only: RLIMIT_NPROC stops a non-root fork before the group kill is needed")
def test_process_group_kill_collects_what_a_program_started(no_strays):
    """Without the hook (as if a fork got past it) children that outlive the program are killed with its group."""
    r = run("""
        import os, time
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            print(pid, flush=True)
    """, limits=Limits(timeout=10), audit=False)
    pids = [int(p) for p in r.stdout.split()]
    try:
        assert r.passed and len(pids) == 3 and r.seconds < 5
        deadline = time.monotonic() + 5
        while not all(gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(gone(p) for p in pids)
    finally:
        for p in pids:
            if not gone(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(ROOT, reason="RLIMIT_NPROC does not bind root")
def test_nproc_limit_stops_a_fork_without_the_hook(no_strays):
    r = run("import os\nos.fork()", audit=False)
    assert r.status == "failed" and "BlockingIOError" in r.stderr


# ---------------------------------------------------------------- memory and output


@pytest.mark.parametrize("audit", [True, False])
def test_huge_allocation_is_a_memory_error_in_the_child(audit):
    r = run("x = bytearray(64 << 30)", audit=audit)
    assert r.status == "failed" and "MemoryError" in r.stderr
    r = run("chunks = []\nwhile True: chunks.append(bytearray(16 << 20))", limits=Limits(memory_bytes=256 << 20),
            audit=audit)
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_file_size_limit():
    r = run("open('big', 'wb').write(b'x' * (2 << 20))", limits=Limits(file_bytes=1 << 20))
    assert r.status == "failed" and "File too large" in r.stderr


def test_output_is_capped():
    r = run("import sys\nsys.stdout.write('x' * 20_000_000)\nsys.stderr.write('y' * 20_000_000)",
            limits=Limits(max_output=1000))
    assert r.passed and r.truncated and r.stdout == "x" * 1000 and r.stderr == "y" * 1000
    r = run("while True: print('z' * 1000)", limits=Limits(timeout=1, max_output=4096))
    assert r.status == "timeout" and r.truncated and len(r.stdout) == 4096


# ---------------------------------------------------------------- files


ESCAPES = {
    "open": "open(NEW, 'w').write('x')",
    "os.open": "os.open(NEW, os.O_WRONLY | os.O_CREAT)",
    "pathlib": "pathlib.Path(NEW).write_text('x')",
    "bytes-path": "open(os.fsencode(NEW), 'wb')",
    "append": "open(OLD, 'a').write('x')",
    "read-plus": "open(OLD, 'r+').write('x')",
    "relative": "open(os.path.relpath(NEW), 'w')",
    "proc-root": "open('/proc/self/root' + NEW, 'w')",
    "proc-cwd": "open('/proc/self/cwd/../' + os.path.relpath(NEW, os.path.dirname(os.getcwd())), 'w')",
    "remove": "os.remove(OLD)",
    "rename-out": "open('x', 'w').close(); os.rename('x', NEW)",
    "rename-in": "os.rename(OLD, 'x')",
    "truncate": "os.truncate(OLD, 0)",
    "chmod": "os.chmod(OLD, 0o777)",
    "fchmod": "os.chmod(os.open(OLD, os.O_RDONLY), 0o777)",
    "utime": "os.utime(OLD, (0, 0))",
    "mkdir": "os.mkdir(NEW)",
    "rmtree": "shutil.rmtree(DIR)",
    "copy": "open('x', 'w').close(); shutil.copy('x', NEW)",
    "mkstemp": "tempfile.mkstemp(dir=DIR)",
    "symlink": "os.symlink(NEW, 'link'); open('link', 'w')",
    "hardlink": "os.link(OLD, 'link'); open('link', 'w')",
    "chdir": "os.chdir(DIR); open('new.txt', 'w')",
    "dir-fd": "fd = os.open(DIR, os.O_RDONLY); os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    "mkdir-dir-fd": "fd = os.open('.', os.O_RDONLY); os.mkdir(os.path.relpath(NEW), dir_fd=fd)",
    "sqlite": "import sqlite3; sqlite3.connect(NEW)",
}


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_writing_outside_the_sandbox_is_refused(name, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "old.txt").write_text("untouched")
    before = snapshot(outside)
    r = run(f"import os, pathlib, shutil, tempfile\nDIR, OLD, NEW = {str(outside)!r}, {str(outside / 'old.txt')!r}, "
            f"{str(outside / 'new.txt')!r}\n{ESCAPES[name]}\n")
    assert refused(r), r.stderr
    assert snapshot(outside) == before


def test_protected_home_cannot_be_read_or_listed(tmp_path):
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "secret.txt").write_text("TOKEN-123")
    limits = Limits(protect=(str(home),))
    for body in ["print(open(HOME + '/secret.txt').read())", "print(os.listdir(HOME))",
                 "print(list(os.scandir(HOME + '/sub')))",
                 "print(open('/proc/self/root' + HOME + '/secret.txt').read())",
                 "print(open(HOME + '/sub/../secret.txt').read())"]:
        r = run(f"import os\nHOME = {str(home)!r}\n{body}", limits=limits)
        assert refused(r) and "TOKEN" not in r.stdout, (body, r.stderr)
    # glob swallows the PermissionError of the listing it was refused: it finds nothing
    r = run(f"import pathlib\nprint(list(pathlib.Path({str(home)!r}).glob('*')))", limits=limits)
    assert r.stdout == "[]\n"


def test_the_real_home_is_protected_by_default():
    assert os.path.realpath(os.path.expanduser("~")) in protected_dirs()
    r = run(f"import os\nprint(os.listdir({protected_dirs()[0]!r}))")
    assert refused(r, "os.listdir"), r.stderr


def test_the_interpreters_own_files_stay_readable_inside_a_protected_directory():
    """pyenv and venvs keep the standard library under the home: protecting it must not break imports."""
    above = os.path.dirname(os.path.realpath(sys.base_prefix))
    r = run("import decimal, fractions, json, statistics\nprint(json.dumps(1))", limits=Limits(protect=(above,)))
    assert r.passed, r.stderr


def test_other_processes_proc_is_refused_own_is_not():
    r = run("print(open('/proc/self/status').read()[:5])")
    assert r.passed, r.stderr
    r = run("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert refused(r, "open") and "PATH" not in r.stdout


@pytest.mark.parametrize("path", ["/dev/sda", "/dev/tty", "/dev/mem"])
def test_devices_are_refused(path):
    r = run(f"open({path!r}, 'rb')")
    assert r.status == "failed" and ("sandbox refused" in r.stderr or "FileNotFoundError" in r.stderr)


# ---------------------------------------------------------------- network


def test_network_connections_are_refused():
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port, udp_port = server.getsockname()[1], udp.getsockname()[1]
        for body in [f"socket.create_connection(('127.0.0.1', {port}), timeout=2)",
                     f"socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp_port}))",
                     "socket.socket(socket.AF_UNIX)", "socket.getaddrinfo('localhost', 80)",
                     f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}', timeout=2)"]:
            r = run(f"import socket\n{body}", limits=Limits(timeout=5))
            assert refused(r, "socket"), (body, r.stderr)
        server.settimeout(0.2)
        udp.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
        with pytest.raises(TimeoutError):
            udp.recv(10)


# ---------------------------------------------------------------- the hook itself


@pytest.mark.parametrize("module", ["ctypes", "_ctypes", "subprocess", "sqlite3", "readline", "_xxsubinterpreters",
                                    "_testcapi", "multiprocessing.shared_memory", "numpy"])
def test_modules_that_reach_around_the_hook_are_refused(module):
    r = run(f"import {module}")
    assert refused(r, "import"), r.stderr


@pytest.mark.parametrize("body", [
    # a .pyc written under another name, renamed and imported: importlib would unmarshal it
    "import importlib.util, marshal, os, sys\n"
    "code = marshal.dumps(compile('print(\\'ran\\')', 'evil', 'exec'))\n"
    "open('evil.bin', 'wb').write(importlib.util.MAGIC_NUMBER + bytes(12) + code)\n"
    "os.rename('evil.bin', 'evil.pyc'); sys.path.insert(0, '.'); import evil",
    "import marshal\nmarshal.loads(marshal.dumps(compile('1', 'x', 'eval')))",
    "compile('1', 'x', 'eval').replace(co_code=b'')",
    "import types\ntypes.CodeType(0, 0, 0, 0, 0, 0, b'', (), (), (), '', '', '', 0, b'', b'', (), ())",
], ids=["pyc-import", "marshal", "code-replace", "code-new"])
def test_crafted_bytecode_routes_are_refused(body):
    r = run(body)
    assert refused(r) and "ran" not in r.stdout, r.stderr


def test_the_hook_survives_attempts_to_remove_or_subvert_it(tmp_path):
    victim = tmp_path / "victim.txt"
    r = run(f"""
        import builtins, gc, os, posixpath, sys
        VICTIM, Refused, isinstance_ = {str(victim)!r}, PermissionError, isinstance

        def attempt(label, fn):
            try:
                fn()
            except Refused as e:
                print(label, "refused")
                return e
            print(label, "allowed")

        sys.addaudithook(lambda event, args: None)   # hooks only add up: ours still runs
        attempt("gc", gc.get_objects)
        attempt("ctypes", lambda: __import__("ctypes"))
        # patch what a naive hook would call
        builtins.isinstance = builtins.hasattr = lambda *a: True
        os.path.realpath = posixpath.realpath = os.path.abspath = os.path.normpath = lambda p: os.getcwd()
        error = attempt("write", lambda: open(VICTIM, "w"))

        # reach into the hook through the refusal's traceback and rewrite whatever it holds
        def permissive(*args, **kwargs):
            return None

        def rewrite(value, depth=0):
            if isinstance_(value, tuple) and depth < 5:
                for v in value:
                    rewrite(v, depth + 1)
            elif isinstance_(value, (list, dict, set)):
                value.clear()
            elif isinstance_(value, type(permissive)):
                attempt("code", lambda: setattr(value, "__code__", permissive.__code__))
                for cell in value.__closure__ or ():
                    cell.cell_contents = permissive

        tb, frames = error.__traceback__, []
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in frames:
            if frame.f_globals is not globals():
                for value in frame.f_locals.values():
                    rewrite(value)
                for name, value in list(frame.f_globals.items()):
                    if isinstance_(value, type(permissive)):
                        frame.f_globals[name] = permissive
        attempt("write again", lambda: open(VICTIM, "w"))
    """)
    assert r.passed, r.stderr
    lines = r.stdout.splitlines()
    assert {"gc refused", "ctypes refused", "write refused", "code refused", "write again refused"} <= set(lines)
    assert not any(line.endswith("allowed") for line in lines), r.stdout
    assert not victim.exists()


def test_hook_functions_read_no_globals_or_builtins():
    """What the hook decides cannot be changed by patching a global or a builtin: they use only their arguments."""
    for f in (sandbox._hook_verdict, sandbox._resolve, sandbox._inside):
        loads = [i.argval for i in dis.get_instructions(f) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")]
        assert loads == [], (f.__name__, loads)


def test_resolve_agrees_with_realpath(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "up").symlink_to("..")
    (tmp_path / "link").symlink_to(tmp_path / "a" / "b")
    (tmp_path / "loop").symlink_to("loop")
    monkeypatch.chdir(tmp_path / "a")
    fs = (isinstance, str, bytes, int, str.__str__, bytes.decode, int.__index__, os.getcwd, os.lstat, os.readlink,
          stat.S_ISLNK, OSError)
    for path in ["b", "./b/../b", "up/link/new.txt", str(tmp_path / "link" / ".." / "up" / "up"), "/", "../../x",
                 os.fsencode(str(tmp_path / "link")), "missing/../b"]:
        assert sandbox._resolve(path, fs) == os.fsdecode(os.path.realpath(path)), path
    with open(tmp_path / "a" / "b" / "f", "w") as f:
        assert sandbox._resolve(f.fileno(), fs) == str(tmp_path / "a" / "b" / "f")
    assert sandbox._resolve(None, fs) == str(tmp_path / "a")
    with pytest.raises(OSError):
        sandbox._resolve(str(tmp_path / "loop"), fs)
