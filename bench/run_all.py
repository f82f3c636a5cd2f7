"""`make bench`: every benchmark in turn; each prints its own table, and bench/results.md gets them all.

`python bench/run_all.py NAME...` runs only those (module names) and leaves results.md alone."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (
    audit_bench,
    auth_bench,
    common,
    footprint_bench,
    fuzz_bench,
    hot_path_bench,
    load_bench,
    mtls_bench,
    phi_eval,
    rag_bench,
    retrieval_eval,
    scale_bench,
    voice_eval,
)

BENCHMARKS = [
    hot_path_bench,
    mtls_bench,
    auth_bench,
    scale_bench,
    audit_bench,
    retrieval_eval,
    phi_eval,
    rag_bench,
    voice_eval,
    load_bench,
    fuzz_bench,
    footprint_bench,
]

if __name__ == "__main__":
    only = sys.argv[1:]
    started = time.strftime("%Y-%m-%d %H:%M")
    for bench in BENCHMARKS:
        if not only or bench.__name__.split(".")[-1] in only:
            bench.main()
    if not only:  # results.md holds one whole run; a partial run only prints
        (Path(__file__).parent / "results.md").write_text(common.results_markdown(started) + "\n")
