"""Where the device time of a profiled run goes: the traces of `benchmark.py --profile_dir`.

python tools/bench/profile_summary.py DIR [--top=N]

Reads every *.xplane.pb under DIR (jax.profiler.ProfileData, no TensorBoard plugin needed)
and prints, per trace, the device's busy time per XLA module run and the operations that take
the most device time (an accelerator's "XLA Ops" line, else its kernel streams; on a CPU the
XLA threads' events), each with its share of the total.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys


def _device_lines(plane) -> list:
    lines = list(plane.lines)
    ops = [ln for ln in lines if ln.name == "XLA Ops"]
    if ops:
        return ops
    streams = [ln for ln in lines if ln.name.startswith("Stream")]
    return streams or [ln for ln in lines if ln.name != "python"]


def summarise(path: str, top: int) -> list[str]:
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    devices = [p for p in data.planes if p.name.startswith("/device:")]
    planes = devices or [p for p in data.planes if p.name.startswith("/host:CPU")]
    out = [f"{path}"]
    for plane in planes:
        by_op: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        for line in _device_lines(plane):
            for ev in line.events:
                by_op[ev.name] += ev.duration_ns
                counts[ev.name] += 1
        total = sum(by_op.values())
        if not total:
            continue
        modules = collections.defaultdict(list)
        for line in plane.lines:
            if line.name == "XLA Modules":
                for ev in line.events:
                    modules[ev.name].append(ev.duration_ns)
        out.append(f"  {plane.name}: {total / 1e6:,.2f} ms of operations in the trace")
        for name, durs in sorted(modules.items(), key=lambda kv: -sum(kv[1])):
            out.append(
                f"    module {name[:70]}: {len(durs)} runs, {sum(durs) / len(durs) / 1e6:,.3f} ms "
                "each"
            )
        for name, ns in by_op.most_common(top):
            out.append(f"    {ns / total:6.1%} {ns / 1e6:10.3f} ms {counts[name]:6d}x  {name[:90]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a folder holding jax.profiler traces (searched recursively)")
    ap.add_argument("--top", type=int, default=15, help="operations listed per trace")
    args = ap.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        print(f"profile_summary: no *.xplane.pb under {args.dir}", file=sys.stderr)
        return 1
    for path in paths:
        print("\n".join(summarise(path, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
