"""Wall time and peak RSS of a command, measured in a fresh wrapper process.

The wrapper has exactly one child, so RUSAGE_CHILDREN's ru_maxrss is that
command's own peak (a benchmark script's own memory never counts).
"""

from __future__ import annotations

import json
import subprocess
import sys

_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if r.returncode:
    sys.stderr.write(r.stderr)
print(json.dumps({"rc": r.returncode, "seconds": wall,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """``{"rc", "seconds", "peak_rss_mb"}`` of ``cmd``; exits with its stderr if it fails."""
    res = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"measure failed: {res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["rc"]:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{res.stderr}")
    return out
