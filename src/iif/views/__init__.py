"""Results made readable: text, pictures and pages.

- ``report``: pictures of proponents and opponents (matplotlib Figures) and shared formatting.
- ``show``: the text summary of a result folder (``iif show``).
- ``explain``: one test sample explained in text and a picture (``iif explain``).
- ``html_report``: a self-contained HTML page of a result (``iif report --html``).

Imports: every part below (ground floor, task, engine, results, methods); never ``iif.runs``:
a view takes a loaded task function (``iif.task.job``), not a command line.
"""
