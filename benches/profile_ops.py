#!/usr/bin/env python3
"""Where two runs spend their time, operator by operator: reads the Chrome traces that
`longmix bench --profile` and `benches/reference.py --profile` write (LibTorch's profiler on
both sides) and prints each operator's self time (its time minus the operators it called) in
both, largest difference first.

    benches/profile_ops.py /tmp/longmix.json /tmp/reference.json
"""
import collections, json, sys


def self_times(path):
    events = json.load(open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "kernel", "gpu_op")]
    out, calls = collections.Counter(), collections.Counter()
    by_thread = collections.defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"), e.get("cat") == "kernel")].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # (end, name, child time)
        for e in evs:
            while stack and stack[-1][0] <= e["ts"]:
                end, name, child = stack.pop()
                out[name] -= child
            if stack:
                stack[-1][2] += e["dur"]
            out[e["name"]] += e["dur"]
            calls[e["name"]] += 1
            stack.append([e["ts"] + e["dur"], e["name"], 0])
        for end, name, child in stack:
            out[name] -= child
    return out, calls


def main():
    (a, ca), (b, cb) = self_times(sys.argv[1]), self_times(sys.argv[2])
    names = sorted(set(a) | set(b), key=lambda n: -abs(a[n] - b[n]))
    print(f"{'operator':44} {'first ms':>10} {'calls':>6} {'second ms':>10} {'calls':>6} {'diff ms':>9}")
    for n in names[: int(sys.argv[3]) if len(sys.argv) > 3 else 30]:
        print(f"{n[:44]:44} {a[n] / 1e3:10.1f} {ca[n]:6d} {b[n] / 1e3:10.1f} {cb[n]:6d} {(a[n] - b[n]) / 1e3:9.1f}")
    print(f"{'total self time':44} {sum(a.values()) / 1e3:10.1f} {'':6} {sum(b.values()) / 1e3:10.1f}")


if __name__ == "__main__":
    main()
