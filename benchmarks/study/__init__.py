"""The studies behind docs/results.md: runs of the GRPO example, resumable, and what they show.

- :mod:`.run`: variants, run directories, executing runs (each a call of the example's ``main``
  in its own process; finished runs are skipped);
- :mod:`.aggregate`: collapse, curves, crossings, boundaries, KL calibration;
- :mod:`.report`: the stability study's figures and tables;
- :mod:`.stability`: the stability study on the toy model (``benchmarks/stability.py``);
- :mod:`.real_model`: the study on SmolLM2-135M-Instruct (``benchmarks/real_model.py``).
"""
