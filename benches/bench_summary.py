"""One line of a `longmix bench --json` result: python3 benches/bench_summary.py [FILE] (default stdin)."""
import json
import sys

r = json.load(open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin)
print(
    f"{r['model']} {r['seq_len']}x{r['rows']} packed {r['packed_share']}: {r['tokens_per_s']:.0f} tok/s, "
    f"MFU {r['mfu'] or 0:.1%}, peak {r['cuda_peak_allocated_mb']:.0f} MB (estimate {r['memory_estimate_mb']:.0f} MB)"
)
