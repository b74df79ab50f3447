"""Run a benchmark script against another rftlab source tree (an older commit's worktree), with this
venv, bypassing the editable install of the current tree: side-by-side comparisons of two commits.

    git worktree add /tmp/rftlab_old <commit>
    .venv/bin/python benchmarks/at_source.py /tmp/rftlab_old /tmp/rftlab_old/benchmarks/reward_speed.py --out old.json
"""

from __future__ import annotations

import runpy
import sys


def main() -> None:
    root, script, *rest = sys.argv[1:]
    # The editable install's finder would import the current tree whatever sys.path says.
    sys.meta_path = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
    sys.path.insert(0, root)
    import rftlab

    if not rftlab.__file__.startswith(root):
        raise SystemExit(f"imported {rftlab.__file__}, not the tree at {root}")
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
