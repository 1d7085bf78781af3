#!/usr/bin/env python3
"""Disk under retention: does the data dir plateau under a sustained rate?

Starts the given crucible binary on a fresh data dir (file sink on, evaluation retention
and event retention shortened), submits `print(n)` evaluations at RATE/s for SECS seconds
(stdlib only, loopback), and every 10 s prints: elapsed, evaluations accepted, stored,
pruned, sled's size, the store dir's allocated bytes (du). Usage:

  benches/retention.py BIN [RATE] [SECS] [RETAIN_SECS]
"""
import json, os, subprocess, sys, tempfile, threading, time, urllib.request

bin_ = sys.argv[1]
rate = float(sys.argv[2]) if len(sys.argv) > 2 else 25
secs = float(sys.argv[3]) if len(sys.argv) > 3 else 300
retain = int(sys.argv[4]) if len(sys.argv) > 4 else 30
d = tempfile.mkdtemp(prefix="crucible-retention-")
cfg = os.path.join(d, "c.toml")
with open(cfg, "w") as f:
    f.write(f"""log_level = "warn"
log_format = "human"
workers = 2
[store]
retain_evaluations_secs = {retain}
[outbox]
retain_secs = {retain}
prune_interval_secs = 5
[sinks.file]
path = "{d}/events.jsonl"
""")
data = os.path.join(d, "data")
p = subprocess.Popen([bin_, "serve", "--config", cfg, "--data-dir", data, "--listen", "127.0.0.1:0"],
                     stderr=open(os.path.join(d, "log"), "w"))
addr_file = os.path.join(data, "listen.addr")
while not (os.path.exists(addr_file) and open(addr_file).read().endswith("\n")):
    time.sleep(0.05)
base = "http://" + open(addr_file).read().strip()

def health():
    return json.load(urllib.request.urlopen(base + "/health"))

accepted = 0
stop = False
def load():
    global accepted
    n = 0
    t0 = time.time()
    while not stop:
        n += 1
        due = t0 + n / rate
        now = time.time()
        if due > now:
            time.sleep(due - now)
        body = json.dumps({"code": f"print({n})"}).encode()
        req = urllib.request.Request(base + "/api/eval", body, {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req).read()
            accepted += 1
        except Exception as e:
            print("submit failed:", e, file=sys.stderr)

def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total

th = threading.Thread(target=load, daemon=True)
th.start()
t0 = time.time()
print("secs accepted stored pruned sled_MiB store_du_MiB rss_MiB")
while time.time() - t0 < secs:
    time.sleep(10)
    h = health()
    rss = int([l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
    print(f"{time.time()-t0:.0f} {accepted} {h['store']['evaluations']} {h['store']['evaluations_pruned']} "
          f"{h['store']['size_on_disk_bytes']/2**20:.1f} {du(os.path.join(data, 'store'))/2**20:.1f} {rss}", flush=True)
stop = True
p.terminate()
p.wait()
