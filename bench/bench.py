#!/usr/bin/env python3
"""Side-by-side benchmark: the local disk, an sshfs mount and a sharefs mount.

Starts a sharefs server (TLS on, the default) and a private sshd, both on 127.0.0.1 and
over the same backing disk, mounts both, runs the same workloads against the three
directories, and writes a table of medians and ratios. Cleans up every process and mount
it started, also on failure. See BENCHMARKS.md.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def drop_caches():
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        log("cannot drop caches:", e)


def rss_peak_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak(pid):
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5\n")
    except OSError:
        pass


class Env:
    """Everything started for a run; `close()` undoes it all."""

    def __init__(self, root, target_dir):
        self.root = root
        self.bin = target_dir
        self.procs = []
        self.mounts = []

    def spawn(self, cmd, **kw):
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def close(self):
        for m in reversed(self.mounts):
            subprocess.run(["fusermount3", "-uz", str(m)], stderr=subprocess.DEVNULL)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def wait_line(proc, want, timeout=60):
    """Reads proc.stdout until a line containing `want`; returns it."""
    result = {}

    def reader():
        for line in proc.stdout:
            if want in line:
                result["line"] = line.strip()
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if "line" not in result:
        raise RuntimeError(f"{proc.args[0]} did not print {want!r}")
    return result["line"]


# ----------------------------------------------------------------------------- setup


def start_sharefs_server(env, data, port, extra=()):
    srv = env.bin / "sharefs-server"
    for user in ["bench", "bob"]:
        if not (data / "users.json").exists() or user not in (data / "users.json").read_text():
            run([srv, "user", "add", user, "--data", data, "--password-stdin"], input=b"pw\n",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    p = env.spawn([srv, "serve", "--data", data, "--listen", f"127.0.0.1:{port}", *extra],
                  stdout=subprocess.PIPE, stderr=open(env.root / f"server-{port}.log", "a"), text=True)
    wait_line(p, "listening")
    startup = time.monotonic() - started
    fp = None
    cert = data / "tls" / "cert.pem"
    if cert.exists():
        out = run(["openssl", "x509", "-in", cert, "-outform", "DER"], capture_output=True).stdout
        import hashlib
        fp = "SHA256:" + hashlib.sha256(out).hexdigest()
    return p, fp, startup


def mount_sharefs(env, port, fp, user, mnt, dbus=None, server=None):
    """Mounts as `user` from 127.0.0.1:`port`, or from `server` (a list of nodes)."""
    mnt.mkdir(parents=True, exist_ok=True)
    e = dict(os.environ, SHAREFS_SERVER=server or f"127.0.0.1:{port}", SHAREFS_USER=user, SHAREFS_PASSWORD="pw",
             SHAREFS_MOUNT_READY="1", SHAREFS_KNOWN_SERVERS=str(env.root / "known_servers"))
    if fp:
        e["SHAREFS_SERVER_FINGERPRINT"] = fp
    else:
        e["SHAREFS_PLAINTEXT"] = "1"
    if dbus:
        e["DBUS_SESSION_BUS_ADDRESS"] = dbus
    p = env.spawn([env.bin / "sharefs", "mount", mnt, "--foreground", "--cache-dir", env.root / f"cache-{user}-{mnt.name}"],
                  env=e, stdout=subprocess.PIPE, stderr=open(env.root / f"mount-{user}-{mnt.name}.log", "a"), text=True)
    wait_line(p, "ready")
    env.mounts.append(mnt)
    return p


def unmount(env, mnt, proc):
    run(["fusermount3", "-u", mnt])
    env.mounts.remove(mnt)
    proc.wait(30)


def start_sshd(env, port):
    d = env.root / "ssh"
    d.mkdir()
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host"])
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "client"])
    shutil.copy(d / "client.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o600)
    cfg = d / "sshd_config"
    cfg.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host'}
AuthorizedKeysFile {d / 'authorized_keys'}
PidFile {d / 'sshd.pid'}
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
    Path("/run/sshd").mkdir(exist_ok=True)
    env.spawn(["/usr/sbin/sshd", "-D", "-e", "-f", cfg], stderr=open(d / "sshd.log", "a"))
    for _ in range(100):
        r = subprocess.run(["ssh", "-p", str(port), "-i", d / "client", "-o", "StrictHostKeyChecking=no",
                            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "root@127.0.0.1", "true"],
                           stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            return d
        time.sleep(0.1)
    raise RuntimeError("sshd did not come up")


def mount_sshfs(env, port, keydir, remote_dir, mnt):
    mnt.mkdir(parents=True, exist_ok=True)
    run(["sshfs", f"root@127.0.0.1:{remote_dir}", mnt, "-p", str(port),
         "-o", f"IdentityFile={keydir / 'client'}", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "Ciphers=aes128-gcm@openssh.com", "-o", "kernel_cache"])
    env.mounts.append(mnt)


# ------------------------------------------------------------------------- workloads


def timed(f):
    t = time.monotonic()
    f()
    return time.monotonic() - t


def fio(args):
    out = run(["fio", "--output-format=json", *args], capture_output=True, text=True).stdout
    return json.loads(out)["jobs"][0]


class Workloads:
    def __init__(self, env, targets, sizes):
        self.env = env
        self.targets = targets  # name -> directory
        self.s = sizes
        self.src = env.root / "src"
        self.src.mkdir()
        run(["dd", "if=/dev/urandom", f"of={self.src / 'big'}", "bs=1M", f"count={self.s['big_mib']}", "status=none"])
        self.small = os.urandom(4096)
        flat = env.root / "tarsrc"
        flat.mkdir()
        for i in range(self.s["small"]):
            (flat / f"t{i:05}").write_bytes(os.urandom(4096))
        run(["tar", "cf", env.root / "small.tar", "-C", flat, "."])

    def cp_in(self, d):
        dst = d / "big"
        t = timed(lambda: (run(["cp", self.src / "big", dst]), run(["sync", dst])))
        return self.s["big_mib"] / t

    def cp_out(self, d):
        drop_caches()
        out = self.env.root / "out.bin"
        t = timed(lambda: run(["cp", d / "big", out]))
        out.unlink()
        return self.s["big_mib"] / t

    def fio_write(self, d):
        f = d / "fio.dat"
        t = timed(lambda: fio(["--name=w", f"--filename={f}", "--rw=write", "--bs=1M", f"--size={self.s['big_mib']}M",
                               "--ioengine=psync", "--end_fsync=1"]))
        return self.s["big_mib"] / t

    def fio_read(self, d):
        f = d / "fio.dat"
        drop_caches()
        t = timed(lambda: fio(["--name=r", f"--filename={f}", "--rw=read", "--bs=1M", f"--size={self.s['big_mib']}M",
                               "--ioengine=psync"]))
        return self.s["big_mib"] / t

    def randread(self, d):
        f = d / "fio.dat"
        drop_caches()
        j = fio(["--name=rr", f"--filename={f}", "--rw=randread", "--bs=4k", "--direct=1", f"--size={self.s['big_mib']}M",
                 "--ioengine=psync", "--time_based", f"--runtime={self.s['rand_secs']}"])
        return j["read"]["iops"], j["read"]["lat_ns"]["mean"] / 1000

    def create_small(self, d):
        n = self.s["small"]

        def go():
            for i in range(n):
                with open(d / f"s{i:05}", "wb") as f:
                    f.write(self.small)
        return n / timed(go)

    def cat_small(self, d):
        n = self.s["small"]
        drop_caches()

        def go():
            for i in range(n):
                with open(d / f"s{i:05}", "rb") as f:
                    f.read()
        return n / timed(go)

    def rm_small(self, d, prefix="s"):
        names = [p for p in os.listdir(d) if p.startswith(prefix)]
        return len(names) / timed(lambda: [os.unlink(d / p) for p in names])

    def untar(self, d):
        n = self.s["small"]
        t = timed(lambda: run(["tar", "xf", self.env.root / "small.tar", "-C", d, "--no-same-owner", "--no-same-permissions"]))
        for p in os.listdir(d):
            if p.startswith("t"):
                os.unlink(d / p)
        return n / t

    # ---- tree workloads: the shapes of real projects, not one flat folder

    def make_tree_sources(self):
        """A tree of `tree_files` 4 KiB files in `tree_dirs` directories, a tarball of
        `find_files` empty-ish files in `find_dirs` directories, and a git repository."""
        s = self.s
        tree = self.env.root / "treesrc"
        per = s["tree_files"] // s["tree_dirs"]
        for d in range(s["tree_dirs"]):
            dd = tree / f"dir{d // 20:02}" / f"sub{d:03}"
            dd.mkdir(parents=True)
            for f in range(per):
                (dd / f"f{f:03}.c").write_bytes(self.small)
        self.tree = tree
        many = self.env.root / "findsrc"
        per = s["find_files"] // s["find_dirs"]
        for d in range(s["find_dirs"]):
            dd = many / f"d{d // 50:02}" / f"e{d:04}"
            dd.mkdir(parents=True)
            for f in range(per):
                (dd / f"x{f:03}").write_bytes(b"y" * 100)
        run(["tar", "cf", self.env.root / "find.tar", "-C", many, "."])
        shutil.rmtree(many)
        # The repository under test is a real mid-size git history; a synthetic one
        # stands in when there is none (a source tarball).
        repo = self.env.root / "repo"
        if (REPO / ".git").exists():
            run(["git", "clone", "-q", "--bare", "--no-local", str(REPO), repo])
        else:
            work = self.env.root / "repo-work"
            shutil.copytree(tree, work)
            g = ["git", "-C", work, "-c", "user.name=b", "-c", "user.email=b@example.org"]
            run(["git", "init", "-q", work])
            for i in range(20):
                (work / "log").write_text(f"{i}\n" * (i + 1))
                run([*g, "add", "-A"])
                run([*g, "commit", "-q", "-m", str(i)])
            run(["git", "clone", "-q", "--bare", work, repo])
        self.repo = repo

    def cp_r_tree(self, d):
        dst = d / "tree"
        t = timed(lambda: run(["cp", "-r", self.tree, dst]))
        self.tree_copy = dst
        return self.s["tree_files"] / t

    def rm_r_tree(self, d):
        return self.s["tree_files"] / timed(lambda: run(["rm", "-r", d / "tree"]))

    def git_clone(self, d):
        dst = d / "clone"
        t = timed(lambda: run(["git", "clone", "-q", "--no-hardlinks", self.repo, dst]))
        run(["rm", "-rf", dst])
        return t

    def populate_find(self, d):
        run(["mkdir", "-p", d / "many"])
        run(["tar", "xf", self.env.root / "find.tar", "-C", d / "many", "--no-same-owner"])

    def find_du(self, d):
        drop_caches()
        def go():
            out = run(["find", d / "many", "-type", "f"], capture_output=True, text=True).stdout
            assert out.count("\n") == self.s["find_files"], out.count("\n")
            run(["du", "-s", d / "many"], stdout=subprocess.DEVNULL)
        return timed(go)

    def populate_deep(self, d):
        deep = d / "deep"
        path = deep / "/".join(["a"] * 31)
        path.mkdir(parents=True)
        (path / "leaf").write_bytes(b"z")
        (deep / "leaf").write_bytes(b"z")

    def stat_depth(self, d, depth):
        p = d / "deep" / "/".join(["a"] * (depth - 1)) / "leaf" if depth > 1 else d / "deep" / "leaf"
        os.stat(p)
        n = 2000
        t = timed(lambda: [os.stat(p) for _ in range(n)])
        return t / n * 1e6


def median(xs):
    return statistics.median(xs)


# ------------------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", action="store_true", help="small sizes, one round (< 3 minutes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="markdown output (default BENCHMARKS.md, or bench/short-results.md)")
    ap.add_argument("--target-dir", default=str(REPO / "target" / "release"))
    a = ap.parse_args()
    short = a.short
    sizes = dict(big_mib=64, small=200, listing=1000, rand_secs=3, growth=[100, 1000], eight_mib=16, notes=20,
                 tree_files=500, tree_dirs=20, find_files=2000, find_dirs=20) if short else \
        dict(big_mib=1024, small=2000, listing=10000, rand_secs=10, growth=[100, 10000, 100000], eight_mib=256, notes=200,
             tree_files=5000, tree_dirs=200, find_files=100000, find_dirs=1000)
    rounds = 1 if short else a.rounds
    out_path = Path(a.out) if a.out else (REPO / ("bench/short-results.md" if short else "BENCHMARKS.md"))

    root = Path(tempfile.mkdtemp(prefix="sharefs-bench-", dir="/var/tmp"))
    env = Env(root, Path(a.target_dir))
    results = {}
    extra = {}

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        local = root / "local"
        local.mkdir()
        ssh_data = root / "ssh-data"
        ssh_data.mkdir()
        keydir = start_sshd(env, 2222)
        mount_sshfs(env, 2222, keydir, ssh_data, root / "mnt-sshfs")
        data = root / "sharefs-data"
        server, fp, _ = start_sharefs_server(env, data, 7171)
        mnt = root / "mnt-sharefs"
        mount_proc = mount_sharefs(env, 7171, fp, "bench", mnt)
        # Every workload runs inside a sub-directory, as a user's would.
        targets = {"local": local / "work", "sshfs": root / "mnt-sshfs" / "work", "sharefs": mnt / "bench" / "work"}
        for d in targets.values():
            d.mkdir()
        w = Workloads(env, targets, sizes)

        plan = [
            ("cp in 1 GiB (incl. fsync)", "MiB/s", w.cp_in, True),
            ("cp out 1 GiB, cold", "MiB/s", w.cp_out, True),
            ("fio seq write 1 MiB", "MiB/s", w.fio_write, True),
            ("fio seq read 1 MiB, cold", "MiB/s", w.fio_read, True),
            ("create 2,000 x 4 KiB", "files/s", w.create_small, True),
            ("cat 2,000 x 4 KiB, cold", "files/s", w.cat_small, True),
            ("rm 2,000 files", "files/s", w.rm_small, True),
            ("untar 2,000 x 4 KiB", "files/s", w.untar, True),
        ]
        reset_peak(server.pid)
        reset_peak(mount_proc.pid)
        for r in range(rounds):
            for name, unit, f, higher in plan:
                for t, d in targets.items():  # interleaved: every target each round
                    try:
                        v = f(d)
                    except Exception as e:  # keep going; report the failure
                        log(f"{name} on {t} failed: {e}")
                        v = float("nan")
                    results.setdefault(name, {"unit": unit, "higher": higher}).setdefault(t, []).append(v)
                    log(f"round {r + 1} {sized(name, sizes):28} {t:8} {v:10.1f} {unit}")
            for t, d in targets.items():
                try:
                    iops, lat = w.randread(d)
                except Exception as e:
                    log(f"randread on {t} failed: {e}")
                    iops, lat = float("nan"), float("nan")
                results.setdefault("4 KiB random read O_DIRECT, QD1", {"unit": "IOPS", "higher": True}).setdefault(t, []).append(iops)
                results.setdefault("4 KiB random read latency", {"unit": "us", "higher": False}).setdefault(t, []).append(lat)
                log(f"round {r + 1} randread {t:8} {iops:10.0f} IOPS {lat:8.1f} us")

        extra["server peak RSS during the single-client workloads incl. 1 GiB copies (KiB)"] = rss_peak_kib(server.pid)
        extra["mount peak RSS during the single-client workloads incl. 1 GiB copies (KiB)"] = rss_peak_kib(mount_proc.pid)

        # Trees: cp -r and rm -r of a source tree, git clone, stat at depth 1 and 32,
        # find + du over many files in many directories (cold: fresh mounts, no caches).
        w.make_tree_sources()
        tree_label = f"cp -r {sizes['tree_files']:,} files in {sizes['tree_dirs']} dirs"
        rm_label = f"rm -r {sizes['tree_files']:,} files in {sizes['tree_dirs']} dirs"
        find_label = f"find + du {sizes['find_files']:,} files in {sizes['find_dirs']:,} dirs, cold"
        for t, d in targets.items():
            w.populate_deep(d)
            w.populate_find(d)
        for r in range(rounds):
            for name, unit, f, higher in [
                (tree_label, "files/s", w.cp_r_tree, True),
                (rm_label, "files/s", w.rm_r_tree, True),
                ("git clone (this repository)", "s", w.git_clone, False),
                ("stat at depth 1, warm", "us", lambda d: w.stat_depth(d, 1), False),
                ("stat at depth 32, warm", "us", lambda d: w.stat_depth(d, 32), False),
            ]:
                for t, d in targets.items():
                    try:
                        v = f(d)
                    except Exception as e:
                        log(f"{name} on {t} failed: {e}")
                        v = float("nan")
                    results.setdefault(name, {"unit": unit, "higher": higher}).setdefault(t, []).append(v)
                    log(f"round {r + 1} {name:36} {t:8} {v:10.3f} {unit}")
            unmount(env, root / "mnt-sshfs", subprocess.Popen(["true"]))
            mount_sshfs(env, 2222, keydir, ssh_data, root / "mnt-sshfs")
            unmount(env, mnt, mount_proc)
            mount_proc = mount_sharefs(env, 7171, fp, "bench", mnt)
            for t, d in targets.items():
                try:
                    v = w.find_du(d)
                except Exception as e:
                    log(f"find + du on {t} failed: {e}")
                    v = float("nan")
                results.setdefault(find_label, {"unit": "s", "higher": False}).setdefault(t, []).append(v)
                log(f"round {r + 1} {find_label:36} {t:8} {v:10.3f} s")
        for t, d in targets.items():
            run(["rm", "-rf", d / "many", d / "deep"])

        # ls -l of a big folder, first (fresh mounts) and warm.
        n = sizes["listing"]
        for t, d in targets.items():
            for i in range(n):
                with open(d / f"l{i:06}", "wb") as f:
                    f.write(b"x")
        for r in range(rounds):
            # Fresh mounts: nothing listed yet.
            unmount(env, root / "mnt-sshfs", subprocess.Popen(["true"]))
            mount_sshfs(env, 2222, keydir, ssh_data, root / "mnt-sshfs")
            unmount(env, mnt, mount_proc)
            mount_proc = mount_sharefs(env, 7171, fp, "bench", mnt)
            drop_caches()
            for t, d in targets.items():
                first = timed(lambda: run(["ls", "-l", d], stdout=subprocess.DEVNULL))
                warm = timed(lambda: run(["ls", "-l", d], stdout=subprocess.DEVNULL))
                results.setdefault(f"ls -l {n:,} files, first", {"unit": "s", "higher": False}).setdefault(t, []).append(first)
                results.setdefault(f"ls -l {n:,} files, warm", {"unit": "s", "higher": False}).setdefault(t, []).append(warm)
                log(f"round {r + 1} ls -l {t:8} first {first:.3f}s warm {warm:.3f}s")
        for t, d in targets.items():
            w.rm_small(d, prefix="l")

        # 8 clients at once, each copying its own file in; peak RSS of server and mount.
        per = sizes["eight_mib"]
        srcs = []
        for i in range(8):
            s = root / f"eight{i}"
            run(["dd", "if=/dev/urandom", f"of={s}", "bs=1M", f"count={per}", "status=none"])
            srcs.append(s)
        reset_peak(server.pid)
        reset_peak(mount_proc.pid)
        for t, d in targets.items():
            def go():
                ps = [subprocess.Popen(["sh", "-c", f'cp "{s}" "{d}/eight{i}" && sync "{d}/eight{i}"']) for i, s in enumerate(srcs)]
                for p in ps:
                    if p.wait() != 0:
                        raise RuntimeError("cp failed")
            secs = timed(go)
            results.setdefault(f"8 clients x {per} MiB in, aggregate", {"unit": "MiB/s", "higher": True}).setdefault(t, []).append(8 * per / secs)
            log(f"8 clients {t}: {8 * per / secs:.0f} MiB/s")
        extra["server peak RSS during the 8-client run (KiB)"] = rss_peak_kib(server.pid)
        extra["mount peak RSS during the 8-client run (KiB)"] = rss_peak_kib(mount_proc.pid)

        # Notification latency: bob opens alice's (bench's) files; time from open() to the
        # Notify call reaching a notification service on a private session bus.
        notes = sizes["notes"]
        bus = env.spawn(["dbus-daemon", "--config-file=/usr/share/dbus-1/session.conf", "--nofork", "--print-address=1",
                         f"--address=unix:dir={root}"],
                        stdout=subprocess.PIPE, text=True)
        address = bus.stdout.readline().strip()
        rec_bin = env.bin / "sharefs-bench-notify-recorder"
        rec = env.spawn([rec_bin], env=dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address), stdout=subprocess.PIPE, text=True)
        wait_line(rec, "ready")
        seen = {}

        def collect():
            for line in rec.stdout:
                ts, _, summary = line.strip().partition(" ")
                seen[summary] = float(ts)

        threading.Thread(target=collect, daemon=True).start()
        unmount(env, mnt, mount_proc)
        mount_proc = mount_sharefs(env, 7171, fp, "bench", mnt, dbus=address)
        for i in range(notes):
            (mnt / "bench" / f"n{i:04}").write_bytes(b"n")
        bob_mnt = root / "mnt-bob"
        bob = mount_sharefs(env, 7171, fp, "bob", bob_mnt)
        opened = {}
        for i in range(notes):
            name = f"n{i:04}"
            opened[name] = time.time()
            with open(bob_mnt / "bench" / name, "rb") as f:
                f.read()
            deadline = time.time() + 5
            while f"bob downloaded {name}" not in seen and time.time() < deadline:
                time.sleep(0.0005)
            # Downloads within 300 ms of the previous one join its pop-up (replaced in
            # place by a digest): each open here waits that long, to start a pop-up of
            # its own whose latency is the one a user sees.
            time.sleep(0.35)
        lat = sorted((seen[f"bob downloaded {n}"] - t) * 1000 for n, t in opened.items() if f"bob downloaded {n}" in seen)
        if lat:
            extra["notification latency p50 (ms)"] = round(lat[len(lat) // 2], 2)
            extra["notification latency p99 (ms)"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2)
        extra["notifications received"] = f"{len(lat)}/{notes}"
        unmount(env, bob_mnt, bob)

        # Cost growth: stat and ls -l with N files in a folder; server start with N files.
        growth = []
        for count in sizes["growth"]:
            gdata = root / f"growth-{count}"
            make_folder(gdata, "bench", count)
            gp, gfp, start_s = start_sharefs_server(env, gdata, 7272)
            gm = root / f"mnt-growth-{count}"
            gmp = mount_sharefs(env, 7272, gfp, "bench", gm)
            drop_caches()
            ls_first = timed(lambda: run(["ls", "-l", gm / "bench"], stdout=subprocess.DEVNULL))
            stat_t = []
            for i in range(50):
                p = gm / "bench" / f"g{(i * 7919) % count:07}"
                stat_t.append(timed(lambda: os.stat(p)))
            # A file not looked up before, on a fresh mount (no listing cached).
            unmount(env, gm, gmp)
            gmp = mount_sharefs(env, 7272, gfp, "bench", gm)
            cold_stat = timed(lambda: os.stat(gm / "bench" / f"g{count // 2:07}"))
            growth.append((count, start_s, ls_first, ls_first / count * 1e6, statistics.median(stat_t) * 1e6, cold_stat * 1e3))
            log(f"growth {count}: start {start_s:.3f}s ls {ls_first:.3f}s stat {statistics.median(stat_t) * 1e6:.0f}us cold stat {cold_stat * 1e3:.1f}ms")
            unmount(env, gm, gmp)
            gp.terminate()
            gp.wait()
        extra["growth"] = growth
    finally:
        env.close()
        # Also when stopped (SIGTERM, Ctrl-C): the run's files take gigabytes.
        shutil.rmtree(root, ignore_errors=True)

    write_report(out_path, results, extra, sizes, rounds, short)
    log("wrote", out_path)


def make_folder(data, user, count):
    """Writes a data directory with `count` 1-byte files for `user`, in the server's
    on-disk format: files/<user>/snapshot.json (format 2: the tree's entries by id; the
    files in the root) naming byte ranges of pack-1.dat."""
    d = data / "files" / user
    d.mkdir(parents=True)
    base = 1 << 60
    now = time.time_ns()
    digest = "805a31dee1a2a0d3fbe08c612de4fe6be78166a3c4d3a4db7805ad839ed47d4d"  # BLAKE3 of b"g"
    (d / "pack-1.dat").write_bytes(b"g" * count)
    root = {"id": 1, "parent": 0, "name": "", "kind": "dir", "mode": 0o755, "mtime_ns": now, "atime_ns": now,
            "ctime_ns": now}
    entries = [root] + [{"id": 2 + i, "parent": 1, "name": f"g{i:07}", "kind": "file", "mode": 0o644, "size": 1,
                         "mtime_ns": now, "atime_ns": now, "ctime_ns": now, "version": base + i, "blake3": digest,
                         "content": {"pack": {"pack": 1, "offset": i}}} for i in range(count)]
    (d / "snapshot.json").write_text(json.dumps({"format": 2, "journal": 0, "next_id": count + 2, "entries": entries}))


def fmt(v, unit):
    if v != v:  # NaN
        return "failed"
    if unit in ("s",):
        return f"{v:.3f}"
    if unit == "us":
        return f"{v:.0f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def sized(name, sizes):
    """A workload's label with the sizes of this mode (short mode is smaller)."""
    name = name.replace("1 GiB", f"{sizes['big_mib']} MiB" if sizes["big_mib"] != 1024 else "1 GiB")
    return name.replace("2,000", f"{sizes['small']:,}")


def write_report(path, results, extra, sizes, rounds, short):
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {'SHORT mode' if short else 'full mode'}, "
        f"{rounds} interleaved round(s), median shown.",
        f"Machine: {os.cpu_count()} cores ({cpu}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, "
        f"kernel {platform.release()}. All three on the same disk, servers on 127.0.0.1.",
        "",
        "| workload | unit | local | sshfs | sharefs | sharefs/sshfs | sharefs/local |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        unit = r["unit"]
        m = {t: median(r[t]) for t in ("local", "sshfs", "sharefs") if t in r}
        def ratio(a, b):
            if a != a or b != b or b == 0:
                return "-"
            return f"{a / b:.2f}"
        name = sized(name, sizes)
        lines.append(f"| {name} | {unit} | {fmt(m['local'], unit)} | {fmt(m['sshfs'], unit)} | {fmt(m['sharefs'], unit)} | "
                     f"{ratio(m['sharefs'], m['sshfs'])} | {ratio(m['sharefs'], m['local'])} |")
    lines.append("")
    for k, v in extra.items():
        if k == "growth":
            continue
        lines.append(f"- {k}: {v}")
    if extra.get("growth"):
        lines += ["", "Cost growth (sharefs; one folder of N files):", "",
                  "| files | server start | ls -l first | ls -l per file | stat (listing cached) | stat, fresh mount |",
                  "|---|---|---|---|---|---|"]
        for count, start_s, ls_s, per_us, stat_us, cold_ms in extra["growth"]:
            lines.append(f"| {count:,} | {start_s:.3f} s | {ls_s:.3f} s | {per_us:.1f} us | {stat_us:.0f} us | {cold_ms:.2f} ms |")
    text = "\n".join(lines) + "\n"
    if path.name == "BENCHMARKS.md" and path.exists():
        # Keep the hand-written parts; replace the results section.
        old = path.read_text()
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        if start in old and end in old:
            text = old.split(start)[0] + start + "\n" + text + end + old.split(end)[1]
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
