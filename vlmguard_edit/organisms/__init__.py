"""The offline model organisms: tiny VLMs with a safety alignment gap by construction, the
development zoo, the exact judge that reads their declared answer grammar, and the tiny
model configs the tests build.

Development and measurement, not the runtime: convert, calibrate and eval only meet an
organism through `exact.load_exact_judge(folder)`, which finds a model folder's declared
grammar (and its own image task, `ExactJudge.probes`); nothing below this package imports
it by name.
"""
