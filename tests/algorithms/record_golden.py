"""Record the golden values of the algorithm layer: ``python tests/algorithms/record_golden.py``.

Computes every case of ``golden_cases.CASES`` and writes ``tests/algorithms/golden_values.pt``
(``torch.save`` of ``{"meta": {...}, "cases": {name: run_case(name)}}``), which
``test_algorithms_golden.py`` compares against. Re-record only when a change of the numbers is
intended (and say why in the commit); a refactor must pass against the recorded file unchanged.

    python tests/algorithms/record_golden.py [case ...]   # default: every case
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import golden_cases  # noqa: E402

OUT = HERE / "golden_values.pt"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(names: list[str]) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))  # as tests/conftest.py
    unknown = [n for n in names if n not in golden_cases.CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(golden_cases.CASES)}")
    previous = torch.load(OUT, weights_only=False)["cases"] if OUT.exists() and names else {}
    cases = dict(previous)
    for name in names or list(golden_cases.CASES):
        start = time.perf_counter()
        cases[name] = golden_cases.run_case(name)
        print(f"{name}: loss {cases[name]['loss']:.6g}, {len(cases[name]['metrics'])} metrics, "
              f"{len(cases[name]['grads']) + len(cases[name]['fingerprints'])} gradients "
              f"({time.perf_counter() - start:.1f} s)")
    cases = {n: cases[n] for n in golden_cases.CASES if n in cases}
    meta = {"commit": _commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "full_gradient_limit": golden_cases.FULL_GRADIENT_LIMIT}
    torch.save({"meta": meta, "cases": cases}, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(cases)} cases)")


if __name__ == "__main__":
    main(sys.argv[1:])
