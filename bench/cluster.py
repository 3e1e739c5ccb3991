#!/usr/bin/env python3
"""Scale-out benchmark: 8 clients spread over 1, 2 and 3 cluster nodes, against the
embedded default, on one machine.

Starts a private PostgreSQL (initdb in a temp directory, as `nobody`) and an S3 server
(`s3s-fs`, an S3 API over a directory), then for each configuration 8 mounts of 8 users,
mount i attached to node i mod N (listing every node, as clients do). Each workload runs
in all 8 mounts at once; the table gives aggregate rates and the CPU seconds each part of
the system spent on it (from /proc), which says where the bottleneck is. Everything it
started is stopped, also on failure. See BENCHMARKS.md, "Scale-out".
"""

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import REPO, MiB, Env, drop_caches, fmt, log, mount_sharefs, run, wait_line

CLIENTS = 8
S3_KEY, S3_SECRET = "sharefs-bench", "sharefs-bench-secret"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise SystemExit(f"{name} not found: apt-get install postgresql")
    return found[-1]


def cpu_seconds(pids):
    """User + system CPU seconds of `pids` so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


class Backend:
    """A private PostgreSQL and s3s-fs; `close()` stops both."""

    def __init__(self, env, nodelay, delay_ms=0):
        self.env = env
        self.dir = env.root / "pg"
        self.dir.mkdir()
        shutil.chown(self.dir, "nobody", "nogroup")
        self.port = free_port()
        as_nobody = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        run(as_nobody + [pg_bin("initdb"), "-D", self.dir / "data", "-U", "sharefs", "--auth=trust", "-E", "UTF8"],
            stdout=subprocess.DEVNULL)
        opts = f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1 -c max_connections=300"
        run(as_nobody + [pg_bin("pg_ctl"), "-D", self.dir / "data", "-w", "-o", opts, "-l", self.dir / "log", "start"],
            stdout=subprocess.DEVNULL)
        self.as_nobody = as_nobody
        s3s = shutil.which("s3s-fs") or str(Path.home() / ".cargo/bin/s3s-fs")
        self.s3_dir = env.root / "s3"
        self.s3_dir.mkdir()
        self.s3_port = free_port()
        s3_env = dict(os.environ)
        if nodelay:
            shim = env.root / "nodelay.so"
            run(["cc", "-shared", "-fPIC", "-O2", "-o", shim, REPO / "bench/nodelay.c", "-ldl"])
            s3_env["LD_PRELOAD"] = str(shim)
        self.s3 = env.spawn([s3s, "--host", "127.0.0.1", "--port", str(self.s3_port), "--access-key", S3_KEY,
                             "--secret-key", S3_SECRET, self.s3_dir], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=s3_env)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.s3_port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("s3s-fs did not start")
                time.sleep(0.05)
        # The port the nodes use: s3s-fs's, or a proxy's that delays each way.
        self.node_port = self.s3_port
        if delay_ms:
            self.node_port = free_port()
            self.proxy = env.spawn([sys.executable, REPO / "bench/delay.py", str(self.node_port),
                                    f"127.0.0.1:{self.s3_port}", str(delay_ms)], stdout=subprocess.PIPE, text=True)
            wait_line(self.proxy, "listening")

    def database(self, name):
        run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "sharefs", "-d", "postgres", "-q", "-c",
             f"CREATE DATABASE {name}"])
        (self.s3_dir / f"sharefs-{name}").mkdir()
        return f"postgres://sharefs@127.0.0.1:{self.port}/{name}"

    def pids(self):
        out = subprocess.run(["pgrep", "-u", "nobody", "postgres"], capture_output=True, text=True).stdout.split()
        return [int(p) for p in out]

    def close(self):
        subprocess.run(self.as_nobody + [pg_bin("pg_ctl"), "-D", self.dir / "data", "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_nodes(env, backend, name, count, read_ahead):
    """`count` nodes over database and bucket `name`, sharing the first's certificate;
    users u0..u7 added once. Returns (procs, addresses, fingerprint)."""
    srv = env.bin / "sharefs-server"
    url = backend.database(name)
    node_env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    for i in range(CLIENTS):
        run([srv, "user", "add", f"u{i}", "--metadata", url, "--password-stdin"], input=b"pw\n",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs, addrs = [], []
    first = env.root / f"{name}-n0"
    for n in range(count):
        data = env.root / f"{name}-n{n}"
        port = free_port()
        tls = [] if n == 0 else ["--tls-cert", first / "tls/cert.pem", "--tls-key", first / "tls/key.pem"]
        p = env.spawn([srv, "serve", "--data", data, "--listen", f"127.0.0.1:{port}", "--metadata", url,
                       "--blobs", f"s3://sharefs-{name}", "--s3-endpoint", f"http://127.0.0.1:{backend.node_port}",
                       "--s3-read-ahead", str(read_ahead), *tls],
                      env=node_env, stdout=subprocess.PIPE, stderr=open(env.root / f"{name}-n{n}.log", "a"), text=True)
        try:
            wait_line(p, "listening")
        except RuntimeError:
            log((env.root / f"{name}-n{n}.log").read_text())
            raise
        procs.append(p)
        addrs.append(f"127.0.0.1:{port}")
    return procs, addrs, fingerprint(first)


def start_embedded(env):
    srv = env.bin / "sharefs-server"
    data = env.root / "embedded"
    for i in range(CLIENTS):
        run([srv, "user", "add", f"u{i}", "--data", data, "--password-stdin"], input=b"pw\n",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    p = env.spawn([srv, "serve", "--data", data, "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                  stderr=open(env.root / "embedded.log", "a"), text=True)
    wait_line(p, "listening")
    return [p], [f"127.0.0.1:{port}"], fingerprint(data)


def fingerprint(data):
    import hashlib
    der = run(["openssl", "x509", "-in", data / "tls/cert.pem", "-outform", "DER"], capture_output=True).stdout
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def in_parallel(fns):
    """Runs each of `fns` on its own thread; returns the wall time of all."""
    errors = []

    def wrap(f):
        try:
            f()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(f,)) for f in fns]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.monotonic() - t0


def workloads(dirs, sizes, src):
    big = sizes["big_mib"]
    small = sizes["small"]
    payload = os.urandom(4096)

    def copy_in(d):
        def f():
            with open(src, "rb") as i, open(d / "big", "wb") as o:
                while chunk := i.read(MiB):
                    o.write(chunk)
        return f

    def copy_out(d):
        def f():
            with open(d / "big", "rb") as i:
                while i.read(MiB):
                    pass
        return f

    def create(d):
        def f():
            (d / "many").mkdir()
            for n in range(small):
                with open(d / "many" / f"f{n:05}", "wb") as o:
                    o.write(payload)
        return f

    def read_all(d):
        def f():
            for n in range(small):
                with open(d / "many" / f"f{n:05}", "rb") as i:
                    i.read()
        return f

    def remove(d):
        def f():
            for n in range(small):
                os.unlink(d / "many" / f"f{n:05}")
        return f

    return [
        (f"{CLIENTS} x {big} MiB in", "MiB/s", lambda: CLIENTS * big, [copy_in(d) for d in dirs], False),
        (f"{CLIENTS} x {big} MiB out, cold", "MiB/s", lambda: CLIENTS * big, [copy_out(d) for d in dirs], True),
        (f"{CLIENTS} x {small:,} creates of 4 KiB", "files/s", lambda: CLIENTS * small, [create(d) for d in dirs], False),
        (f"{CLIENTS} x {small:,} reads of 4 KiB, cold", "files/s", lambda: CLIENTS * small, [read_all(d) for d in dirs], True),
        (f"{CLIENTS} x {small:,} removes", "files/s", lambda: CLIENTS * small, [remove(d) for d in dirs], False),
    ]


def run_config(env, label, procs, addrs, fp, sizes, src, parts):
    """Mounts CLIENTS users over `addrs` and runs the workloads; returns {workload: (rate, cpu)}."""
    mounts = []
    dirs = []
    for i in range(CLIENTS):
        # Mount i is attached to node i mod N first and lists every node.
        order = addrs[i % len(addrs):] + addrs[:i % len(addrs)]
        mnt = env.root / f"mnt-{label}-{i}"
        m = mount_sharefs(env, 0, fp, f"u{i}", mnt, server=",".join(order))
        mounts.append(m)
        d = mnt / f"u{i}" / "work"
        d.mkdir()
        dirs.append(d)
    out = {}
    for name, unit, amount, fns, cold in workloads(dirs, sizes, src):
        if cold:
            drop_caches()
        groups = {"nodes": [p.pid for p in procs], "mounts": [m.pid for m in mounts], **parts()}
        before = {k: cpu_seconds(v) for k, v in groups.items()}
        wall = in_parallel(fns)
        cpu = {k: cpu_seconds(v) - before[k] for k, v in groups.items()}
        out[name] = (unit, amount() / wall, cpu, wall)
        log(f"{label}: {name}: {amount() / wall:,.0f} {unit} in {wall:.2f} s; cpu " +
            ", ".join(f"{k} {v:.2f} s" for k, v in cpu.items()))
    for i, m in enumerate(mounts):
        mnt = env.root / f"mnt-{label}-{i}"
        subprocess.run(["fusermount3", "-u", mnt])
        env.mounts.remove(mnt)
        m.wait(30)
    for p in procs:
        p.terminate()
        p.wait(30)
    return out


def main():
    global CLIENTS
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="small sizes (about a minute)")
    ap.add_argument("--out", default=None, help="markdown output (default: the Scale-out section of BENCHMARKS.md)")
    ap.add_argument("--target-dir", default=str(REPO / "target" / "release"))
    ap.add_argument("--s3-nodelay", action="store_true",
                    help="start s3s-fs with TCP_NODELAY on its connections (bench/nodelay.c)")
    ap.add_argument("--s3-read-ahead", type=int, default=0, metavar="MIB",
                    help="the nodes' --s3-read-ahead (default 0, as theirs)")
    ap.add_argument("--clients", type=int, default=CLIENTS, help=f"mounts, one user each (default {CLIENTS})")
    ap.add_argument("--s3-delay", type=float, default=0, metavar="MS",
                    help="put this round-trip delay between the nodes and s3s-fs (bench/delay.py)")
    ap.add_argument("--configs", default="embedded,1,2,3",
                    help="which to run, of embedded and 1, 2, 3 nodes (default: all)")
    a = ap.parse_args()
    CLIENTS = a.clients
    sizes = dict(big_mib=16, small=100) if a.short else dict(big_mib=128, small=500)
    root = Path(tempfile.mkdtemp(prefix="sharefs-cluster-bench-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    env = Env(root, Path(a.target_dir))
    backend = None
    results = {}

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        src = root / "src"
        with open(src, "wb") as f:
            for _ in range(sizes["big_mib"]):
                f.write(os.urandom(MiB))
        configs = a.configs.split(",")
        if "embedded" in configs:
            procs, addrs, fp = start_embedded(env)
            results["embedded"] = run_config(env, "embedded", procs, addrs, fp, sizes, src, lambda: {})
        backend = Backend(env, a.s3_nodelay, a.s3_delay)
        for n in (1, 2, 3):
            if str(n) not in configs:
                continue
            procs, addrs, fp = start_nodes(env, backend, f"c{n}", n, a.s3_read_ahead)
            parts = lambda: {"postgres": backend.pids(), "s3s-fs": [backend.s3.pid]}  # noqa: E731
            results[f"{n} node{'s' if n > 1 else ''}"] = run_config(env, f"c{n}", procs, addrs, fp, sizes, src, parts)
    finally:
        env.close()
        if backend:
            backend.close()
        shutil.rmtree(root, ignore_errors=True)
    write_report(a, results, sizes)


def write_report(a, results, sizes):
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    configs = list(results)
    names = list(results[configs[0]])
    lines = [f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
             f"{'SHORT mode' if a.short else 'full mode'}, one round, {os.cpu_count()} cores; PostgreSQL "
             f"{pg_bin('postgres').split('/')[-3]} and s3s-fs{' (TCP_NODELAY: --s3-nodelay)' if a.s3_nodelay else ''} "
             "on the same machine and disk.", "",
             "| workload | unit | " + " | ".join(configs) + " |", "|---|---|" + "---|" * len(configs)]
    for name in names:
        unit = results[configs[0]][name][0]
        lines.append(f"| {name} | {unit} | " + " | ".join(fmt(results[c][name][1], unit) for c in configs) + " |")
    lines += ["", f"CPU seconds spent during each workload, by part (the {CLIENTS} mounts, the server nodes, "
              "PostgreSQL, s3s-fs), and its wall time:", "",
              "| workload | config | wall | mounts | nodes | postgres | s3s-fs |", "|---|---|---|---|---|---|---|"]
    for name in names:
        for c in configs:
            _, _, cpu, wall = results[c][name]
            lines.append(f"| {name} | {c} | {wall:.2f} s | {cpu['mounts']:.2f} | {cpu['nodes']:.2f} | "
                         f"{cpu.get('postgres', 0):.2f} | {cpu.get('s3s-fs', 0):.2f} |")
    text = "\n".join(lines) + "\n"
    path = Path(a.out) if a.out else REPO / "BENCHMARKS.md"
    start, end = "<!-- cluster:start -->", "<!-- cluster:end -->"
    if path.name == "BENCHMARKS.md" and path.exists():
        old = path.read_text()
        if start in old and end in old:
            text = old.split(start)[0] + start + "\n" + text + end + old.split(end)[1]
        else:
            text = old.rstrip() + "\n\n## Scale-out\n\n" + start + "\n" + text + end + "\n"
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
