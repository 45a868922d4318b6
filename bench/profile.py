"""Flame graphs of our server under one workload (py-spy, sampling the real process; needs ptrace rights).

  .venv/bin/python bench/profile.py --workload grpc-stream --clients 16     # bench/results/flame-grpc-stream-16.svg
  .venv/bin/python bench/profile.py --workload rest-steps --clients 1

The server runs the shipped model; the driver (bench/driver.py) loads it while py-spy records, with
--native so that time in C (grpc, numpy, ONNX Runtime) shows under the Python frame that called it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from driver import WORKLOADS  # noqa: E402
from run import DEFAULT_MODELS, PY, RESULTS, running, start_ours  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="grpc-stream", choices=WORKLOADS)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0)
    a = p.parse_args()
    spy = Path(PY).with_name("py-spy")
    if not spy.exists():
        print("needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"flame-{a.workload}-{a.clients}.svg"
    ours = start_ours(DEFAULT_MODELS)
    with running(ours):
        port = ours.ports["grpc" if a.workload.startswith("grpc") else "http"]
        load = subprocess.Popen(
            [PY, str(ROOT / "bench" / "driver.py"), "--workload", a.workload, "--port", str(port), "--clients",
             str(a.clients), "--seconds", str(a.seconds + 2), "--warmup", "1"], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.5)
        subprocess.run(
            [str(spy), "record", "--pid", str(ours.pid), "--duration", str(int(a.seconds)), "--rate", "250",
             "--native", "--format", "flamegraph", "--output", str(out)], check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        load.wait()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
