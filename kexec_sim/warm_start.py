"""Warm starts: a command run by a process that has imported its code already.

A Python command spends 0.1-0.3 s importing before it does any work: for ``kexec-sim exec``
and the restoring ``pkramfs`` mount, most of a kexec's blackout. A *warm process* is started
ahead of time (``kexec-sim load`` starts one for the exec, kexec_sim.exec_agent; a pkramfs
mount one for the next boot's mount, pkramfs.standby), imports the command and listens on an
abstract Unix socket named after a kind, its machine and the boot generation it serves.

The command, run as usual, first offers itself (``run_warm``): its argv, environment, working
directory and standard streams (the descriptors themselves) go over; the warm process answers
``started PID``, the command says ``go``, and the command's main runs, exactly as the command
would have run it, in the warm process itself (``serve_one``: the exec agent, which then ends)
or in a child it forks for it (``serve_forking``: the standby, which goes on waiting); the
answer is ``exit CODE``. Signals the command gets meanwhile (Ctrl-C) are passed on to the
process running it; if that process dies, the command says so and kills itself with SIGKILL,
as if it had been killed itself. When nothing listens,
the warm process declines (another user, a machine that has moved on), or it does not answer
in time, the command runs cold, as before: a warm process runs a command only after the
``go``, so a command never runs twice. It holds no state of the machine before a request: the
command checks the machine as it always does.
"""

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

__all__ = [
    "WarmListener",
    "run_warm",
    "running_generation",
    "socket_name",
    "spawn_detached",
    "wait_ready",
]

ANSWER_TIMEOUT_S = 10.0
"""How long a command waits for a warm process to answer (it may still be importing)."""
REQUEST_TIMEOUT_S = 5.0
"""How long a warm process waits for a request's bytes or the ``go``."""
MAX_REQUEST_BYTES = 1 << 20
PING = {"ping": True}
"""A request that asks only whether the warm process is ready (``wait_ready``)."""
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_STREAMS = (0, 1, 2)


def socket_name(kind: str, machine_dir: str, generation: int) -> bytes:
    """The abstract socket of the warm process of *kind* serving boot *generation* of the
    machine in *machine_dir* (its real path: two spellings name one machine)."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(machine_dir))).hexdigest()[:32]
    return f"\0kexec-sim/{kind}/{digest}/{generation}".encode()


def running_generation(machine_dir: str) -> int | None:
    """The generation of the machine's running boot (boot.json), or None when it is off or
    unreadable (the command, run cold, says what is wrong)."""
    try:
        with open(os.path.join(machine_dir, "boot.json"), "rb") as file:
            record = json.loads(file.read(1 << 16))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("powered", True) is not True:
        return None
    generation = record.get("generation")
    return generation if type(generation) is int else None


def spawn_detached(argv: list[str], log_path: str) -> None:
    """Start *argv* (a warm process) in a session of its own, its output appended to
    *log_path*, as a child of init: nobody waits for it. ``setsid -f`` is the short-lived
    middle process (forking this one, numpy and all, costs ~8 ms). Never raises (without a
    warm process, commands run cold)."""
    try:
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        middle = os.posix_spawnp(
            "setsid",
            ["setsid", "--fork", *argv],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log, 1),
                (os.POSIX_SPAWN_DUP2, log, 2),
            ],
        )
        os.waitpid(middle, 0)
    except OSError:
        pass
    finally:
        os.close(log)


# -- the command's side ---------------------------------------------------------------------


def run_warm(kind: str, machine_dir: str, argv: Sequence[str], prog: str) -> int | None:
    """Offer the command *argv* (argv[0] included) to the warm process of *kind* for the
    machine's running boot; return its exit code, or None: run it cold."""
    generation = running_generation(machine_dir)
    if generation is None:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.settimeout(ANSWER_TIMEOUT_S)
            sock.connect(socket_name(kind, machine_dir, generation))
            request = json.dumps(
                {"argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd()}
            ).encode()
            socket.send_fds(sock, [struct.pack("!I", len(request)) + request], list(_STREAMS))
            answer = _read_line(sock)
            if not answer.startswith(b"started "):
                return None  # declined
            pid = int(answer.split()[1])
            _forward_signals(pid)
            sock.sendall(b"go\n")
        except (OSError, ValueError, IndexError):
            return None  # nothing listens, or it did not answer: nothing ran
        return _wait_for_exit(sock, pid, prog)


def _forward_signals(pid: int) -> None:
    """Pass the signals this command would act on to *pid* (one it ignores, as a background
    job ignores SIGINT, stays ignored: the cold command would not have seen it either)."""

    def forward(signum: int, frame: FrameType | None) -> None:
        os.kill(pid, signum)

    for signum in _FORWARDED:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, forward)


def _wait_for_exit(sock: socket.socket, pid: int, prog: str) -> int:
    sock.settimeout(None)
    try:
        answer = _read_line(sock)
    except OSError:
        answer = b""
    if answer.startswith(b"exit "):
        return int(answer.split()[1])
    print(f"{prog}: the process running this command (pid {pid}) was killed", file=sys.stderr)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    return 137  # not reached


def wait_ready(kind: str, machine_dir: str, generation: int, timeout_s: float) -> bool:
    """Wait until the warm process of *kind* for boot *generation* has imported its command
    and listens; whether it does within *timeout_s*."""
    deadline = time.monotonic() + timeout_s
    request = json.dumps(PING).encode()
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.settimeout(max(0.0, deadline - time.monotonic()))
                sock.connect(socket_name(kind, machine_dir, generation))
                sock.sendall(struct.pack("!I", len(request)) + request)
                return _read_line(sock) == b"ready\n"
            except ConnectionRefusedError:
                pass  # not bound yet: it binds first thing
            except OSError:
                return False
        time.sleep(0.005)
    return False


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < 64:
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


# -- the warm process's side ----------------------------------------------------------------

_inherited: list[socket.socket] = []
"""The connection of the command being run: a process it forks (a daemon) must not hold it,
or the command could not tell the warm process's death from its end."""


def _close_inherited() -> None:
    for conn in _inherited:
        conn.close()
    _inherited.clear()


os.register_at_fork(after_in_child=_close_inherited)


class WarmListener:
    """The listening end of a warm process; binding fails (OSError, EADDRINUSE) when another
    process of the same kind already serves that machine's boot *generation*."""

    def __init__(self, kind: str, machine_dir: str, generation: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(socket_name(kind, machine_dir, generation))
            self.sock.listen(16)
        except OSError:
            self.sock.close()
            raise

    def serve_one(
        self,
        main: Callable[[list[str]], int],
        *,
        ready: Callable[[], bool],
        keep_waiting: Callable[[], bool],
        poll_s: float,
    ) -> bool:
        """Wait for a command and run it with *main* (given argv without argv[0]); return True
        once one ran, False when *keep_waiting* (asked every *poll_s* while idle) says stop.
        A request comes in only when *ready* says so (else the command runs cold)."""
        request = self._next_request(ready, keep_waiting, poll_s)
        if request is None:
            return False
        self.close()  # nobody else may connect, nor a child keep the name bound
        _run_and_answer(main, *request)
        return True

    def serve_forking(
        self,
        main: Callable[[list[str]], int],
        *,
        ready: Callable[[], bool],
        keep_waiting: Callable[[], bool],
        poll_s: float,
    ) -> None:
        """Run each command in a child forked for it (its code imported already) and go on
        waiting, until *keep_waiting* says stop. Children are reaped by the kernel."""
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        while (request := self._next_request(ready, keep_waiting, poll_s)) is not None:
            conn, _, _, _, fds = request
            if os.fork() == 0:  # the command
                code = 1
                try:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    self.close()
                    _run_and_answer(main, *request)
                    code = 0
                finally:
                    os._exit(code)
            for fd in fds:
                os.close(fd)
            conn.close()

    def _next_request(
        self, ready: Callable[[], bool], keep_waiting: Callable[[], bool], poll_s: float
    ) -> tuple[socket.socket, list[str], dict[str, str], str, list[int]] | None:
        """The next request agreed to (its connection and contents), or None: stop."""
        while True:
            if not select.select([self.sock], [], [], poll_s)[0]:
                if not keep_waiting():
                    return None
                continue
            conn, _ = self.sock.accept()
            request = _take_request(conn, ready)
            if request is None:
                conn.close()
                continue
            return (conn, *request)

    def close(self) -> None:
        """Stop listening."""
        self.sock.close()


def _take_request(
    conn: socket.socket, ready: Callable[[], bool]
) -> tuple[list[str], dict[str, str], str, list[int]] | None:
    """Read a request to run; None when it is not one: another user's, malformed, a ping
    (answered), or not *ready* (answered ``cold``)."""
    fds: list[int] = []
    try:
        conn.settimeout(REQUEST_TIMEOUT_S)
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        data, fds, _, _ = socket.recv_fds(conn, 65536, len(_STREAMS))
        if uid != os.getuid() or len(data) < 4:
            raise ValueError("not a request to run")
        (size,) = struct.unpack("!I", data[:4])
        if size > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
        data = data[4:]
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ValueError("request cut short")
            data += chunk
        request = json.loads(data)
        if request == PING:
            conn.sendall(b"ready\n")  # imported and listening
            raise ValueError("a ping")
        if len(fds) != len(_STREAMS):
            raise ValueError("no streams")
        argv, env, cwd = request["argv"], request["env"], request["cwd"]
        if not (
            isinstance(argv, list)
            and argv
            and all(isinstance(arg, str) for arg in argv)
            and isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            and isinstance(cwd, str)
        ):
            raise ValueError("malformed request")
        if not ready():
            conn.sendall(b"cold\n")
            raise ValueError("not ready")
    except (OSError, ValueError, KeyError, TypeError):
        for fd in fds:
            os.close(fd)
        return None
    return argv, env, cwd, fds


def _run_and_answer(
    main: Callable[[list[str]], int],
    conn: socket.socket,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    fds: list[int],
) -> None:
    """Agree to run the command in this process (``started`` with its pid, for the signals;
    the command's ``go``), run it, answer its exit code on *conn*, which its children do not
    keep. Nothing runs if the command gave up."""
    with conn:
        try:
            conn.sendall(f"started {os.getpid()}\n".encode())
            if _read_line(conn) != b"go\n":
                raise ValueError("the command gave up")
        except (OSError, ValueError):
            for fd in fds:
                os.close(fd)
            return
        _inherited.append(conn)
        code = _run_as_command(main, argv, env, cwd, fds)
        with contextlib.suppress(OSError):  # the command is gone: its work is done
            conn.sendall(f"exit {code}\n".encode())


def _run_as_command(
    main: Callable[[list[str]], int],
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    fds: list[int],
) -> int:
    """Become the command: its streams, environment, directory and argv; run *main*; give
    the streams back at once (whoever reads the command's output sees it end with it)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    own = [os.dup(target) for target in _STREAMS]
    for target, fd in zip(_STREAMS, fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = argv
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, as in a fresh command
    try:
        try:
            os.chdir(cwd)
        except OSError as exc:  # the directory went away: what the command would have said
            print(f"{os.path.basename(argv[0])}: {cwd}: {exc.strerror}", file=sys.stderr)
            return 1
        code = main(argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for target, fd in zip(_STREAMS, own, strict=True):
            os.dup2(fd, target)
            os.close(fd)
    return code
