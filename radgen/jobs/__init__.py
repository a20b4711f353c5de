"""One thin leaf per ``radgen`` command: parse the arguments, call one library or pipeline, print,
return the exit code. What a command computes lives in a library (``radgen/*.py``,
``radgen/pipelines/``), where tests and other pipelines call it; no leaf imports another, and
nothing imports a leaf (``tests/test_architecture.py``).

The CLI (``radgen/cli.py``) imports a leaf only when its command runs.
"""
