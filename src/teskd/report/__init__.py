"""``teskd report``: a table of runs (finished or not), their groups of seeds with statistics, and a figure.

One concept per module: :mod:`.runs` reads run folders, :mod:`.settings` compares their settings,
:mod:`.groups` groups seeds and computes the statistics, :mod:`.formats` writes table, markdown, csv and
json, :mod:`.figures` draws the ``--plot`` figure.
"""

from teskd.report.figures import LOSS_NOTE, draw_report, group_curves, plot_path, plot_runs
from teskd.report.formats import FORMATS, format_report
from teskd.report.groups import Group, group_runs
from teskd.report.runs import RunInfo, RunRow, find_runs, read_run
from teskd.report.settings import is_operational

__all__ = ["FORMATS", "LOSS_NOTE", "Group", "RunInfo", "RunRow", "draw_report", "find_runs",
           "format_report", "group_curves", "group_runs", "is_operational", "plot_path", "plot_runs", "read_run"]
