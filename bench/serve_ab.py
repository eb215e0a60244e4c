"""Side-by-side A/B of server variants (issue 16's before/after figures). Usage:
    python bench/serve_ab.py --repo REPO --variant "before=/tmp/before|" --variant "after=.|--intra-op-threads 1"
a variant is LABEL=CWD|[ENV=VALUE ...] [server flags]: `python -m serving` run in CWD (e.g. a `git archive` of the
old commit's serving/), so two versions of the code can be compared in one run.
A/B with every variant's server up at once (idle ones cost nothing); per round, per level, each variant in turn:
the peers' loadgen (tritonclient aio) at that level, plus the server's CPU time per request (utime+stime of the
server process over the level / requests it counted in nv_inference_request_success)."""
import argparse, csv, json, os, re, statistics, subprocess, sys, time, urllib.request
from pathlib import Path

PY = sys.executable
LOADGEN = str(Path(__file__).resolve().parents[2] / "shared" / "peers" / "loadgen.py")  # ../shared/peers
p = argparse.ArgumentParser()
p.add_argument("--repo", default="/tmp/perf_repo")
p.add_argument("--variant", action="append", required=True, help="label=cwd|ENV=V flags")
p.add_argument("--conc", default="1,16,64")
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--window", default="2")
p.add_argument("--max-windows", default="4")
p.add_argument("--mode", default="async")
p.add_argument("--model", default="lsoftmax_mnist_onnx")
p.add_argument("--out", default="/tmp/serve_ab_ab2.csv")
a = p.parse_args()
servers = []
for i, v in enumerate(a.variant):
    label, rest = v.split("=", 1)
    cwd, _, flags = rest.partition("|")
    toks = flags.split()
    env = dict(t.split("=", 1) for t in toks if re.match(r"^[A-Z_]+=", t))
    flags = [t for t in toks if not re.match(r"^[A-Z_]+=", t)]
    port = 18100 + 10 * i
    log = f"/tmp/serve_ab_srv_{label}.log"
    proc = subprocess.Popen([PY, "-m", "serving", "--model-repository", a.repo, "--port", str(port),
                             "--metrics-port", str(port + 1), "--log-level", "info", *flags],
                            cwd=cwd, stderr=open(log, "w"), stdout=subprocess.DEVNULL, env={**os.environ, **env})
    servers.append((label, proc, port, log))
try:
    for label, proc, port, log in servers:
        for _ in range(900):
            if '"ready"' in open(log).read(): break
            if proc.poll() is not None: sys.exit(open(log).read())
            time.sleep(0.2)
    def cpu(pid):
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    def served(port):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/metrics", timeout=5).read().decode()
        return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("nv_inference_request_success{"))
    results = []
    for r in range(a.rounds):
        for c in a.conc.split(","):
            order = servers if (r + int(c)) % 2 == 0 else servers[::-1]
            for label, proc, port, log in order:
                tmp = f"/tmp/serve_ab_lg_{label}.csv"
                if os.path.exists(tmp): os.remove(tmp)
                c0, n0 = cpu(proc.pid), served(port)
                subprocess.run([PY, LOADGEN, "--url", f"127.0.0.1:{port}", "--model", a.model, "--concurrency", c,
                                "--window-s", a.window, "--max-windows", a.max_windows, "--mode", a.mode,
                                "--label", label, "--csv", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                c1, n1 = cpu(proc.pid), served(port)
                row = next(csv.DictReader(open(tmp)))
                results.append({"label": label, "round": r, "conc": int(c), "ips": float(row["infer_per_s"]),
                                "p50": float(row["p50"]), "cpu_us": (c1 - c0) / max(1, n1 - n0) * 1e6,
                                "cli_us": float(row.get("client_cpu_us_per_req") or 0)})
                print(json.dumps(results[-1]), flush=True)
finally:
    for label, proc, port, log in servers:
        proc.terminate()
    for label, proc, port, log in servers:
        proc.wait(30)
json.dump(results, open(a.out, "w"))
labels = [s[0] for s in servers]
print(f"\n{'variant':<12}{'conc':>5}{'infer/s (median)':>18}{'ratio':>7}{'p50 us':>10}{'ratio':>7}{'server CPU us/req':>19}{'ratio':>7}  rounds infer/s")
for c in sorted({x["conc"] for x in results}):
    base = None
    for label in labels:
        xs = [x for x in results if x["label"] == label and x["conc"] == c]
        m = {k: statistics.median(x[k] for x in xs) for k in ("ips", "p50", "cpu_us")}
        base = base or m
        print(f"{label:<12}{c:>5}{m['ips']:>18,.0f}{m['ips']/base['ips']:>7.2f}{m['p50']:>10,.0f}{m['p50']/base['p50']:>7.2f}"
              f"{m['cpu_us']:>19,.0f}{m['cpu_us']/base['cpu_us']:>7.2f}  " + " / ".join(format(x["ips"], ".0f") for x in xs))
