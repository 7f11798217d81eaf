import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# examples/ scripts are tested as modules; spawned ranks inherit sys.path, so they can import them too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
