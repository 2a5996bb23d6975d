"""The stability study on the toy GRPO example (``study/stability.py`` says what it runs).

python benchmarks/stability.py                        # everything: variants, then the sweep
python benchmarks/stability.py --stage report         # re-aggregate what has run
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python benchmarks/stability.py` puts only benchmarks/ on the path; the study imports and calls
# the example's package beside it (the tests get both from pytest's pythonpath option)
sys.path.append(str(Path(__file__).resolve().parents[1] / "examples"))

from study.stability import main

if __name__ == "__main__":
    main()
