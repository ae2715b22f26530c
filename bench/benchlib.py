"""bench/benchlib.py: what bench/run (throughput, latency, memory) and
bench/attacks (hostile-client bursts) share: the processes they start and
stop by PID, the generated certificate, the h2c backend (backend.c), and the
three systems under test -- flower-sidecar link, nginx (grpc_pass) and
HAProxy (mode http, proto h2) -- with their configuration files.

Every process is started through spawn() (or run()) and recorded in
`started`, so cleanup() ends exactly those, by PID.  set_run_dir() must be
called before anything that writes files (certificates, configs, logs).
"""
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(ROOT, "build", "bench")
PROXY_CPU, LOAD_CPU = "0", "1"
MIB = 1 << 20
SIDECAR = os.environ.get("BENCH_SIDECAR", os.path.join(ROOT, "build", "flower-sidecar"))
CIPHER = "TLS_AES_128_GCM_SHA256"
# The large idle size in bench/run needs 2 descriptors per connection in
# HAProxy (it reserves one for a backend connection); the hard
# RLIMIT_NOFILE may be below that, so maxconn shrinks to fit.
_HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
NOFILE = min(200000, _HARD_NOFILE if _HARD_NOFILE != resource.RLIM_INFINITY else 200000)
HAPROXY_MAXCONN = min(40000, (NOFILE - 14) // 2)
RUN = None    # the run directory: set_run_dir()
T0 = time.monotonic()
started = {}   # pid -> (name, Popen)
problems = []  # human-readable failures, reported at the end


def set_run_dir(prefix="run-"):
    """Creates build/bench/<prefix><date-time>/ for this run's files."""
    global RUN
    RUN = os.path.join(BUILD, prefix + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(RUN)
    return RUN


def log(msg):
    print("[%6.1fs] %s" % (time.monotonic() - T0, msg), flush=True)


def problem(msg):
    problems.append(msg)
    log("PROBLEM: " + msg)


# --- processes ----------------------------------------------------------------

def spawn(name, argv, cpu, stdout=None, stderr=None, env=None, stdin=None):
    p = subprocess.Popen(["taskset", "-c", cpu] + argv, stdout=stdout or subprocess.DEVNULL,
                         stderr=stderr or subprocess.DEVNULL, stdin=stdin or subprocess.DEVNULL,
                         env=env, cwd=RUN, start_new_session=True)
    started[p.pid] = (name, p)
    return p


def stop(p, sig=signal.SIGTERM, grace=12.0):
    """Stops one process we started, by PID; returns (seconds, killed)."""
    t = time.monotonic()
    killed = False
    if p.poll() is None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            killed = True
    started.pop(p.pid, None)
    return time.monotonic() - t, killed


def cleanup(*_):
    for pid, (name, p) in list(started.items()):
        if p.poll() is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    started.clear()


def on_signal(signum, frame):
    cleanup()
    sys.exit(130)


def run(argv, timeout, cpu=None, **kw):
    """Runs a bounded command; returns CompletedProcess (rc -9 on timeout)."""
    if cpu is not None:
        argv = ["taskset", "-c", cpu] + argv
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, **kw)
    started[p.pid] = ("cmd", p)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        out += "\n[bench: killed after %ss]" % timeout
    started.pop(p.pid, None)
    return subprocess.CompletedProcess(argv, p.returncode, out, "")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # utime + stime (fields 14, 15)


TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    return cpu_ticks(pid) / TCK


def mem_kb(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# --- preparation -----------------------------------------------------------------

DEB = ["nginx", "haproxy", "nghttp2-client", "python3-grpcio", "libnghttp2-dev", "libssl-dev", "openssl",
       "build-essential", "util-linux"]


def ensure_deps():
    missing = []
    for pkg in DEB:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            missing.append(pkg)
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit("bench: missing Debian packages; run: sudo apt-get install -y " + " ".join(missing))
    log("installing " + " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + missing, env=env, check=True,
                   stdout=subprocess.DEVNULL)


TOOLS = (("backend", ["-lnghttp2"]), ("idle", ["-lssl", "-lcrypto"]),
         ("hsbench", ["-lssl", "-lcrypto", "-lnghttp2"]), ("pingpong", []))


def build_tools(names=None):
    os.makedirs(BUILD, exist_ok=True)
    for name, libs in TOOLS:
        if names is not None and name not in names:
            continue
        src, out = os.path.join(HERE, name + ".c"), os.path.join(BUILD, name)
        # hsbench #includes the sidecar's allocator
        deps = [src] + ([os.path.join(ROOT, "proxy", f) for f in ("h2mem.c", "h2mem.h")] if name == "hsbench" else [])
        if not os.path.exists(out) or os.path.getmtime(out) < max(os.path.getmtime(d) for d in deps):
            subprocess.run(["cc", "-O2", "-g", "-Wall", "-Wextra", "-o", out, src] + libs, check=True)
    if not os.access(SIDECAR, os.X_OK):
        sys.exit("bench: %s not found; run `make build/flower-sidecar` (or `make bench`)" % SIDECAR)


def make_certs():
    d = os.path.join(RUN, "tls")
    os.makedirs(d)
    o = lambda *a: subprocess.run(["openssl"] + list(a), cwd=d, check=True, capture_output=True)  # noqa: E731
    o("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    o("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench CA", "-days", "7", "-out", "ca.pem",
      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    o("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "key.pem")
    o("req", "-new", "-key", "key.pem", "-subj", "/CN=localhost", "-out", "srv.csr")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    o("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "7",
      "-extfile", "ext.cnf", "-out", "cert.pem")
    cert, key, ca = (os.path.join(d, n) for n in ("cert.pem", "key.pem", "ca.pem"))
    with open(os.path.join(d, "haproxy.pem"), "w") as f:
        f.write(open(cert).read() + open(key).read())
    # OpenSSL config that forces the suite on the server side for programs
    # without a setting of their own (the sidecar).
    with open(os.path.join(d, "openssl.cnf"), "w") as f:
        f.write("openssl_conf = init\n[init]\nssl_conf = ssl\n[ssl]\nsystem_default = sd\n"
                "[sd]\nMinProtocol = TLSv1.3\nCiphersuites = %s\n" % CIPHER)
    return cert, key, ca


def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def grpc_frame(payload_len, head):
    return b"\x00" + struct.pack(">I", payload_len) + head


# --- the backend ---------------------------------------------------------------------

STAT_FIELDS = ["magic", "ok", "ok_echo", "ok_size", "failed_asked", "bad", "reset", "req_bytes", "resp_bytes",
               "conns_total", "conns_open", "streams_open", "streams_total"]


class Backend:
    def __init__(self, extra=()):
        self.port = free_port()
        self.stats_path = os.path.join(RUN, "backend.stats")
        self.p = spawn("backend", [os.path.join(BUILD, "backend"), str(self.port), self.stats_path] + list(extra),
                       LOAD_CPU, stderr=open(os.path.join(RUN, "backend.log"), "w"))
        if not wait_port(self.port, self.p):
            sys.exit("bench: the backend did not start (see %s/backend.log)" % RUN)

    def stats(self):
        with open(self.stats_path, "rb") as f:
            v = struct.unpack("<%dQ" % len(STAT_FIELDS), f.read(8 * len(STAT_FIELDS)))
        return dict(zip(STAT_FIELDS, v))


# --- systems under test ------------------------------------------------------------------

_instances = {}  # system name -> instances started so far


class System:
    tls = True

    def __init__(self, name, backend, cert, key):
        self.name, self.backend, self.cert, self.key = name, backend, cert, key
        self.p = None
        self.instance = 0

    def url(self, path):
        return "%s://127.0.0.1:%d%s" % ("https" if self.tls else "http", self.port, path)

    def start(self):
        # Numbered per system name across objects: it names the files.
        _instances[self.name] = self.instance = _instances.get(self.name, 0) + 1
        self.port = free_port()
        self.log_path = os.path.join(RUN, "%s-%d.log" % (self.name, self.instance))
        self.p = self._start()
        if not wait_port(self.port, self.p):
            raise RuntimeError("%s did not start; log %s:\n%s" % (self.name, self.log_path, tail(self.log_path)))
        self.pid = self._measured_pid()

    def _measured_pid(self):
        return self.p.pid

    def worker_pids(self):
        """The processes that carry the traffic (nginx: its workers, not the master)."""
        return [self.pid]

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def stop(self):
        if not self.p:
            return
        self.stop_secs, self.stop_killed = stop(self.p)
        if self.stop_killed:
            problem("%s (instance %d) did not exit within 12 s of SIGTERM; killed" % (self.name, self.instance))
        self.p = None


def exit_text(p):
    if p is None or p.returncode is None:
        return "stopped"
    if p.returncode < 0:
        try:
            return "was killed by %s" % signal.Signals(-p.returncode).name
        except ValueError:
            return "was killed by signal %d" % -p.returncode
    return "exited with status %d" % p.returncode


def stderr_tail(system):
    t = tail(system.log_path + ".stderr", 8) if os.path.exists(system.log_path + ".stderr") else ""
    return ("stderr:\n" + t) if t.strip() and t != "(no log)" else ""


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


class Direct(System):
    tls = False

    def start(self):
        self.instance += 1
        self.port = self.backend.port
        self.p = self.backend.p
        self.pid = self.backend.p.pid

    def stop(self):
        self.p = None


class Sidecar(System):
    def _start(self):
        env = dict(os.environ, OPENSSL_CONF=os.path.join(RUN, "tls", "openssl.cnf"))
        argv = [SIDECAR, "link", "--listen", "127.0.0.1:%d" % self.port,
                "--upstream", "127.0.0.1:%d" % self.backend.port, "--tls-cert", self.cert, "--tls-key", self.key,
                "--admin", "127.0.0.1:%d" % free_port(), "--log-level", "WARNING", "--log-file", self.log_path]
        return spawn("sidecar", argv, PROXY_CPU, env=env, stderr=open(self.log_path + ".stderr", "w"))


class Nginx(System):
    def _start(self):
        d = os.path.join(RUN, "nginx-%d" % self.instance)
        os.makedirs(d)
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF % dict(dir=d, log=self.log_path, port=self.port, be=self.backend.port,
                                      cert=self.cert, key=self.key, cipher=CIPHER, nofile=NOFILE,
                                      wc=NOFILE - 100))
        return spawn("nginx", ["/usr/sbin/nginx", "-p", d, "-c", conf], PROXY_CPU,
                     stderr=open(self.log_path + ".stderr", "w"))

    def _measured_pid(self):
        # The one worker does the work; the master only supervises it.
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                with open("/proc/%d/task/%d/children" % (self.p.pid, self.p.pid)) as f:
                    kids = f.read().split()
                if kids:
                    return int(kids[0])
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("nginx worker not found")

    def worker_pids(self):
        try:
            with open("/proc/%d/task/%d/children" % (self.p.pid, self.p.pid)) as f:
                return [int(k) for k in f.read().split()]
        except OSError:
            return []

    def stop(self):
        if self.p:
            self.stop_secs, self.stop_killed = secs, killed = stop(self.p, signal.SIGQUIT)
            if killed:
                problem("nginx (instance %d) did not exit within 12 s of SIGQUIT; killed" % self.instance)
            self.p = None


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile %(nofile)d;
pid %(dir)s/nginx.pid;
error_log %(log)s error;
events { worker_connections %(wc)d; }
http {
    access_log off;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    client_max_body_size 0;
    keepalive_requests 1000000;
    upstream superlink {
        server 127.0.0.1:%(be)d;
        keepalive 128;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:%(port)d ssl http2;
        ssl_certificate %(cert)s;
        ssl_certificate_key %(key)s;
        ssl_protocols TLSv1.3;
        ssl_conf_command Ciphersuites %(cipher)s;
        location / {
            grpc_pass grpc://superlink;
        }
    }
}
"""


class Haproxy(System):
    def _start(self):
        cfg = os.path.join(RUN, "haproxy-%d.cfg" % self.instance)
        with open(cfg, "w") as f:
            f.write(HAPROXY_CONF % dict(port=self.port, be=self.backend.port, pem=self.cert_pem, cipher=CIPHER,
                                        maxconn=HAPROXY_MAXCONN))
        return spawn("haproxy", ["/usr/sbin/haproxy", "-db", "-f", cfg], PROXY_CPU,
                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)

    @property
    def cert_pem(self):
        return os.path.join(RUN, "tls", "haproxy.pem")


HAPROXY_CONF = """\
global
    nbthread 1
    maxconn %(maxconn)d
    ssl-default-bind-ciphersuites %(cipher)s
    ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
    mode http
    maxconn %(maxconn)d
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fleet
    bind 127.0.0.1:%(port)d ssl crt %(pem)s alpn h2
    default_backend superlink
backend superlink
    server s1 127.0.0.1:%(be)d proto h2
"""

CLASSES = {"direct": Direct, "sidecar": Sidecar, "nginx": Nginx, "haproxy": Haproxy}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "%s x %d" % (line.split(":", 1)[1].strip(), os.cpu_count())
    except OSError:
        pass
    return "%d CPUs" % os.cpu_count()


def mem_total():
    with open("/proc/meminfo") as f:
        return "%.0f GiB RAM" % (int(f.readline().split()[1]) / 1024 / 1024)


def versions():
    v = []
    r = run([SIDECAR, "--version"], 10)
    sc = "flower-sidecar " + r.stdout.strip().split()[-1] if r.stdout.strip() else "flower-sidecar ?"
    g = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], 10)
    if g.returncode == 0:
        d = run(["git", "-C", ROOT, "status", "--porcelain", "--", "proxy"], 10)
        sc += " (git %s%s)" % (g.stdout.strip(), ", proxy/ modified" if d.stdout.strip() else "")
    if os.environ.get("BENCH_SIDECAR"):
        sc += " [BENCH_SIDECAR=%s]" % SIDECAR
    v.append(sc)
    r = run(["/usr/sbin/nginx", "-v"], 10)
    v.append(r.stdout.strip().replace("nginx version: ", ""))
    r = run(["/usr/sbin/haproxy", "-v"], 10)
    v.append(" ".join(r.stdout.split()[:3]))
    r = run(["h2load", "--version"], 10)
    v.append(r.stdout.strip())
    r = run(["openssl", "version"], 10)
    v.append(" ".join(r.stdout.split()[:2]))
    return v


