"""One module per ``radgen`` command: each reads files, wires the libraries and writes outputs.

The CLI (``radgen/cli.py``) imports a job's module only when that command runs.
"""
