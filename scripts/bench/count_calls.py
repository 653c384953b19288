#!/usr/bin/env python
"""How much of the project one command runs: distinct project functions called, and their files.

    python scripts/bench/count_calls.py scripts/train.py max_iters=20 eval_interval=10
    python scripts/bench/count_calls.py --list scripts/train.py max_iters=20 eval_interval=10

Every code object of this repository (outside tests/) that starts running under ``sys.setprofile``
(and ``threading.setprofile``) counts once, by (file, first line, name): functions, methods,
lambdas, generator expressions, class bodies and module bodies. List, dict and set comprehensions
are their own code objects before Python 3.12 and inlined from 3.12 on (PEP 709); both totals are
printed, so the figure compares across Python versions. The command runs in this process, as
``python <script> <args>`` would.
"""
from __future__ import annotations

import os
import runpy
import sys
import threading

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>")


def main(argv: list[str]) -> int:
    show = argv[:1] == ["--list"]
    argv = argv[1:] if show else argv
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    script = os.path.abspath(argv[0])
    skip = (os.path.join(REPO, "tests") + os.sep, os.path.join(REPO, ".venv") + os.sep)
    seen: set[tuple[str, int, str]] = set()

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(REPO) and not code.co_filename.startswith(skip):
            seen.add((code.co_filename, code.co_firstlineno, code.co_name))

    sys.argv = argv
    sys.path.insert(0, os.path.dirname(script))
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    files = sorted({f for f, _, _ in seen})
    inlined = [k for k in seen if k[2] in COMPREHENSIONS]
    print(f"{len(seen)} functions in {len(files)} files ({len(seen) - len(inlined)} without comprehensions, "
          f"as Python >= 3.12 counts them); Python {sys.version.split()[0]}", file=sys.stderr)
    if show:
        for f in files:
            names = [n for g, _, n in sorted(seen) if g == f]
            print(f"  {os.path.relpath(f, REPO)}: {len(names)}: {', '.join(names)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
