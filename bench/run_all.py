"""`make bench`: every benchmark in turn; each prints its own table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import audit_bench, auth_bench, phi_eval, rag_bench, retrieval_eval, voice_eval

BENCHMARKS = [auth_bench, audit_bench, retrieval_eval, phi_eval, rag_bench, voice_eval]

if __name__ == "__main__":
    only = sys.argv[1:]
    for bench in BENCHMARKS:
        if not only or bench.__name__.split(".")[-1] in only:
            bench.main()
