"""MkDocs hook: the benchmark figures under ``benchmarks/results`` are published at ``results/``.

The figures stay where the benchmark scripts write them (one copy); pages link to them as
``../results/<path>`` from ``benchmarks/<page>.md``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.rglob("*.png")):
        relative = path.relative_to(RESULTS.parent).as_posix()  # results/<...>.png
        files.append(File(relative, src_dir=str(RESULTS.parent), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
