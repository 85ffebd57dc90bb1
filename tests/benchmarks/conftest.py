"""The benchmark scripts import their siblings (benchmark_utils, ...) as a
run from benchmarks/ would: put that folder on sys.path."""
import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
