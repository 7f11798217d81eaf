"""GPT block at tp 1 and 2 against the cost model; results kept in bench/results/ (read by the tests).

    THP_MEM_ALLOC_ENABLE=1 OMP_NUM_THREADS=1 python bench/scaling.py [--steps 20]
"""

import argparse
from pathlib import Path

from shardwise.commands.bench import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    main(a.hidden, a.heads, a.seq, 1, a.steps, str(Path(__file__).resolve().parent / "results"))
