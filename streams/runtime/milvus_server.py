"""A real Milvus standalone server, reachable on one loopback port and nothing else.

The PyPI package ``milvus`` (2.3.5) ships the Milvus engine (Go and C++,
embedded etcd, local storage) as LZMA-packed binaries, and a ``milvus-server``
wrapper that has three properties an embedded default cannot have: the server
listens on every interface, it takes ten more ports (nine internal gRPC ports
and etcd's, plus a metrics port picked from 9091 upward), and a stopped
wrapper leaves the server running. This module replaces that wrapper.

How it runs (`python -m streams.runtime.milvus_server`, started by
`streams.runtime.stack.EmbeddedStack`):

1. The launcher binds the public port (``127.0.0.1:<milvus_port>``) itself and
   hands the listening socket to this process (``--listen-fd``).
2. This process moves into a network namespace of its own (``unshare``:
   directly as root, through a user namespace otherwise) whose only interface
   is its own loopback. Everything Milvus binds there, on whatever address,
   is reachable from that namespace alone: no other host and no other stack
   can reach it, and every stack uses Milvus's default internal ports without
   colliding with another.
3. It starts ``milvus run standalone`` as its child with ``PR_SET_PDEATHSIG``:
   when this process dies, even by SIGKILL, the kernel kills the server.
4. It relays each connection accepted on the public socket to the proxy port
   inside the namespace (one thread per direction, ``splice``-free plain copies:
   gRPC sends few, large messages).
5. It exits when the server exits; SIGTERM is passed on to the server.

Binaries are unpacked once per machine and package release into a shared
cache (``$XDG_CACHE_HOME/pinfresh/milvus-<release>``, 246 MB), under a file
lock, not once per data dir.

Only the launcher uses this; nothing in the product assumes it (production
points ``PINFRESH_MILVUS__URI`` at a Milvus cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import lzma
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["PROXY_PORT", "ensure_binaries", "isolation_error", "main", "render_config"]

#: The proxy's port inside the namespace (Milvus's default; no other stack can see it).
PROXY_PORT = 19530

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _package_dir() -> Path:
    import milvus  # the `milvus` wheel: engine binaries and the config template

    return Path(milvus.__file__).resolve().parent


def release() -> str:
    """Version of the installed ``milvus`` wheel (e.g. ``2.3.5``)."""
    import milvus

    return str(milvus.__version__)


def cache_root() -> Path:
    """Where unpacked engine binaries are shared between data dirs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pinfresh"


def ensure_binaries(cache: Path | None = None) -> Path:
    """Unpack the engine's binaries once into the shared cache; return the ``bin`` folder.

    Safe to call from several processes at once: one unpacks under an
    exclusive file lock into a temporary folder renamed into place, the
    others wait and reuse it. A folder from a different package build (its
    stamp does not match the packed files' digest) is replaced.
    """
    packed = _package_dir() / "data" / "bin"
    files = sorted(p for p in packed.iterdir() if p.name.endswith(".lzma"))
    stamp = hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in files).encode())
    digest = stamp.hexdigest()[:12]
    root = (cache or cache_root()) / f"milvus-{release()}-{digest}"
    bindir = root / "bin"
    if (root / "complete").exists():
        return bindir
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "complete").exists():
            return bindir
        tmp = root.parent / f".{root.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "bin").mkdir(parents=True)
        for p in files:
            out = tmp / "bin" / p.name.removesuffix(".lzma")
            with lzma.open(p) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            out.chmod(0o755)
        (tmp / "complete").write_text(digest)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return bindir


def render_config(data: Path) -> Path:
    """Write ``<data>/configs/milvus.yaml`` from the package's template; return its path.

    Every ``{{ key(type): default }}`` placeholder takes its default (ports
    included: they live in the private namespace), except the paths, which
    all point under ``data``.
    """
    text = (_package_dir() / "data" / "config.yaml.template").read_text()
    for sub in ("configs", "logs", "data", "run"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    paths = {
        "etcd_log_path": data / "logs" / "etcd.log",
        "etcd_data_dir": data / "data" / "etcd.data",
        "local_storage_dir": data / "data",
        "rocksmq_data_dir": data / "data" / "rocksmq",
        "system_log_path": data / "logs",
    }

    def fill(m: re.Match[str]) -> str:
        body = m.group(1).strip()
        key, _, default = body.partition(":")
        key = key.split("(")[0].strip()
        if key in paths:
            return str(paths[key])
        if key == "proxy_port":
            return str(PROXY_PORT)
        return default.strip()

    out = data / "configs" / "milvus.yaml"
    out.write_text(re.sub(r"\{\{(.*?)\}\}", fill, text))
    shutil.copy(_package_dir() / "data" / "glog.conf", data / "configs" / "glog.conf")
    return out


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _unshare_net() -> None:
    """Enter a new network namespace (through a user namespace when not root)."""
    libc = _libc()
    if libc.unshare(_CLONE_NEWNET) == 0:
        return
    first = ctypes.get_errno()
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(first)}; with a user "
                           f"namespace: {os.strerror(err)}")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def isolation_error() -> str | None:
    """Why this machine cannot give Milvus a private network namespace, or None if it can.

    Runs the check in a short-lived child process (a fresh interpreter, not a
    fork of a caller that may have threads), so the caller stays where it is.
    """
    try:
        out = subprocess.run([sys.executable, "-m", "streams.runtime.milvus_server", "--check"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot check for network namespaces ({exc})"
    if out.returncode == 0:
        return None
    why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
    return f"cannot create a private network namespace for Milvus ({why})"


def _pump(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                break
            dst.sendall(view[:n])
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            src.shutdown(socket.SHUT_RD)


def _serve_one(client: socket.socket) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", PROXY_PORT), timeout=5.0)
    except OSError:
        client.close()  # the server is not listening yet: the client sees a reset and retries
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _relay(listener: socket.socket) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.EINVAL):
                return
            time.sleep(0.1)  # out of file descriptors, say: do not spin
            continue
        threading.Thread(target=_serve_one, args=(client,), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the wrapper process (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m streams.runtime.milvus_server")
    ap.add_argument("--data", type=Path, help="the server's data dir")
    ap.add_argument("--listen-fd", type=int, help="a listening TCP socket, bound by the launcher")
    ap.add_argument("--check", action="store_true",
                    help="only check that a private network namespace can be made here")
    args = ap.parse_args(argv)
    if args.check:
        try:
            _unshare_net()
            _loopback_up()
        except OSError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    if args.data is None or args.listen_fd is None:
        ap.error("--data and --listen-fd are required")
    listener = socket.socket(fileno=args.listen_fd)
    os.set_inheritable(listener.fileno(), False)
    data = args.data.resolve()
    bindir = ensure_binaries()
    config = render_config(data)
    _unshare_net()
    _loopback_up()
    env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": "9091",
           "MILVUS_RUN_DIR": str(data / "run"), "MILVUSCONF": str(config.parent),
           "LD_LIBRARY_PATH": os.pathsep.join(
               p for p in (str(bindir), os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    me = os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - replaced by the server at once
        try:
            _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != me:  # the wrapper died before prctl took effect
                os._exit(1)
            os.chdir(data)
            os.execve(str(bindir / "milvus"), [str(bindir / "milvus"), "run", "standalone"],
                      env)
        finally:
            os._exit(127)

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    threading.Thread(target=_relay, args=(listener,), daemon=True).start()
    print(f"milvus {release()} pid {child}, config {config}, binaries {bindir}", flush=True)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    listener.close()
    code = os.waitstatus_to_exitcode(status)
    print(f"milvus exited ({code})", flush=True)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
